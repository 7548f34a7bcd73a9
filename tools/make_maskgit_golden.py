#!/usr/bin/env python
"""Write ``tests/fixtures/maskgit_vq_golden.npz``: outputs of MaskGIT's official VQGAN tokenizer.

Why: parity of ``models/maskgit_vq.py`` and of ``convert/maskgit_vq.py``'s key map with the
official ``maskgit/nets/vqgan_tokenizer.py`` (the ``VQVAE`` behind the released
``tokenizer_imagenet{256,512}_checkpoint``) is pinned by a small fixture computed here, once.
The official code is JAX/Flax, so this runs in the project venv (flax's Linen API it uses still
exists); its code is imported from the checkout the user names, never copied here.

What it does (float32, seeded):

* takes ``--checkout``: a work tree or a bare git repository of google-research/maskgit. A git
  repository is exported (``git archive HEAD maskgit``) to a temp dir and imported from there;
  its commit is recorded (a plain directory needs ``--commit``);
* builds the official ``VQVAE`` (``train=False``) from the official ``vqgan_config`` at a reduced
  size: filters 8, channel multipliers (1, 2, 2), 2 res blocks, embedding 4, codebook 32 (the
  release: 128, (1, 1, 2, 2, 4), 2, 256, 1024). Flax's GroupNorm defaults to 32 groups, which 8
  channels cannot hold, so the official ``layers.get_norm_layer`` is wrapped to pass 4 groups
  (same class, eps and everything else) for this build only;
* randomises every parameter (GroupNorm gains around 1 and biases around 0 included, so a
  scale/bias mix-up cannot hide);
* runs it on three real photos (scikit-image astronaut, chelsea, coffee; centre crops resized
  to 32² with PIL bicubic as the official ``read_image_from_url`` does; [0, 1] as MaskGIT takes
  them) and stores: the checkpoint bytes ``checkpoint`` (``flax.serialization.to_bytes`` of the
  variables: the release's file format), the sizes ``size/<field>`` (this project's names),
  ``x`` [3, 32, 32, 3], the encoder output ``z`` [3, 8, 8, 4], the token indices ``indices``
  [3, 64] (``encode_to_indices``, row-major), the gap between the best and second-best code
  distance of each token (``margin``), ``decode_from_indices(indices)`` (``decode``) and the
  reconstruction ``decode(encode(x))`` (``recon``), both in MaskGIT's [0, 1] scale, unclamped.

Run (project venv; the flax/jax it has; no torch)::

    .venv/bin/python tools/make_maskgit_golden.py \
        --checkout /work/.mirror/google-research+maskgit/repo \
        --out tests/fixtures/maskgit_vq_golden.npz
"""

from __future__ import annotations

import argparse
import functools
import io
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

#: The reduced official sizes (official vqvae field → value) and the project's names for them.
OFFICIAL = dict(filters=8, channel_multipliers=[1, 2, 2], num_res_blocks=2, embedding_dim=4,
                codebook_size=32)
GROUPS = 4
IMAGE_SIZE = 32
SIZE = dict(ch=8, ch_mult=(1, 2, 2), num_res_blocks=2, code_dim=4, codebook_size=32,
            norm_groups=GROUPS, image_size=IMAGE_SIZE)
PHOTOS = ("astronaut", "chelsea", "coffee")


def git_commit(repo: Path) -> str | None:
    done = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                          text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def official_root(checkout: Path, dest: Path, commit: str | None) -> tuple[Path, str]:
    """A directory holding the official ``maskgit`` package, and its commit."""
    found = git_commit(checkout)
    if found is not None:
        tar = subprocess.run(["git", "-C", str(checkout), "archive", "HEAD", "maskgit"],
                             check=True, capture_output=True).stdout
        with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
            tf.extractall(dest, filter="data")
        return dest, found
    if not (checkout / "maskgit" / "nets" / "vqgan_tokenizer.py").is_file():
        sys.exit(f"{checkout}: neither a git repository nor a maskgit checkout")
    if not commit:
        sys.exit(f"{checkout} is not a git repository: pass --commit=<the checkout's commit>")
    return checkout, commit


def photos() -> np.ndarray:
    """[3, 32, 32, 3] float32 in [0, 1]: centre square crops, PIL bicubic to 32²."""
    from PIL import Image
    from skimage import data

    out = []
    for name in PHOTOS:
        img = getattr(data, name)()
        h, w = img.shape[:2]
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        crop = Image.fromarray(img[top:top + s, left:left + s]).convert("RGB")
        small = crop.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)
        out.append(np.float32(small) / 255.0)
    return np.stack(out)


def randomise(variables, seed: int = 0):
    import flax

    rng = np.random.default_rng(seed)
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables))
    out = {}
    for path, v in flat.items():
        noise = rng.standard_normal(v.shape).astype(np.float32)
        if path[-1] == "scale":
            out[path] = 1.0 + 0.3 * noise
        elif path[-1] == "bias":
            out[path] = 0.1 * noise
        elif path[-1] == "codebook":
            out[path] = noise
        else:  # HWIO kernel
            fan_in = int(np.prod(v.shape[:-1]))
            out[path] = noise * np.float32((1.5 / fan_in) ** 0.5)
    return flax.traverse_util.unflatten_dict(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkout", required=True, type=Path)
    ap.add_argument("--commit", default=None, help="the commit of a checkout without .git")
    ap.add_argument("--out", default="tests/fixtures/maskgit_vq_golden.npz", type=Path)
    args = ap.parse_args()

    import flax
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    with tempfile.TemporaryDirectory() as tmp:
        root, commit = official_root(args.checkout, Path(tmp), args.commit)
        sys.path.insert(0, str(root))
        from maskgit.configs import vqgan_config
        from maskgit.libml import losses
        from maskgit.nets import layers, vqgan_tokenizer

    official_norm = layers.get_norm_layer

    def four_groups(train, dtype, norm_type="BN"):
        norm = official_norm(train=train, dtype=dtype, norm_type=norm_type)
        if norm.func is not nn.GroupNorm:
            raise SystemExit(f"expected the official GroupNorm, got {norm.func}")
        return functools.partial(norm, num_groups=GROUPS)

    vqgan_tokenizer.layers.get_norm_layer = four_groups
    config = vqgan_config.get_config()
    for k, v in OFFICIAL.items():
        config.vqvae[k] = v
    assert config.vqvae.norm_type == "GN" and config.vqvae.activation_fn == "swish"
    assert not config.vqvae.conv_downsample and config.vqvae.quantizer == "vq"
    model = vqgan_tokenizer.VQVAE(config=config, dtype=jnp.float32, train=False)

    x = photos()
    init = model.init(jax.random.PRNGKey(0), {"image": jnp.asarray(x)},
                      method=lambda m, inp: m.decode_from_indices(m.encode_to_indices(inp)))
    variables = randomise(init)
    blob = flax.serialization.to_bytes(variables)
    restored = flax.serialization.from_bytes(None, blob)  # as maskgit utils.restore_from_path

    apply = functools.partial(model.apply, restored, mutable=False)
    xj = jnp.asarray(x)
    z = apply(xj, method=lambda m, im: m.encoder(im))
    indices = apply({"image": xj}, method=model.encode_to_indices)
    quantized, _ = apply({"image": xj}, method=model.encode)
    recon = apply(quantized, method=model.decode)
    decode = apply(indices, method=model.decode_from_indices)
    book = restored["params"]["quantizer"]["codebook"]
    dist = losses.squared_euclidean_distance(z.reshape(-1, z.shape[-1]), jnp.asarray(book))
    top2 = -jax.lax.top_k(-dist, 2)[0]
    b = x.shape[0]
    out = {f"size/{k}": np.asarray(v) for k, v in SIZE.items()}
    out.update(
        checkpoint=np.frombuffer(blob, np.uint8), x=x, z=np.asarray(z),
        indices=np.asarray(indices).reshape(b, -1).astype(np.int32),
        margin=np.asarray(top2[:, 1] - top2[:, 0]).reshape(b, -1),
        decode=np.asarray(decode), recon=np.asarray(recon), commit=np.asarray(commit),
        flax_version=np.asarray(flax.__version__), jax_version=np.asarray(jax.__version__),
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **out)
    n = len(flax.traverse_util.flatten_dict(variables["params"]))
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes; official commit {commit}; "
          f"flax {flax.__version__}, jax {jax.__version__}; {n} tensors; "
          f"{len(np.unique(out['indices']))} distinct codes; "
          f"min tie margin {float(out['margin'].min()):.3g})")


if __name__ == "__main__":
    main()
