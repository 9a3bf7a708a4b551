"""Jitted, batched inference programs behind the ``SCVI`` query methods.

Each program is a ``lax.scan`` over chunks of cell indices of shape ``(n_chunks, batch)`` and
runs the module in evaluation mode (running batch-norm statistics, no dropout). Programs are
cached per model configuration, so repeated calls with the same shapes do not recompile.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxvi._settings import settings
from jaxvi.data import CellData, gather, is_host, pad_indices, shard_host_data, take_rows
from jaxvi.module import VAE, VAEConfig
from jaxvi.parallel import local_cell_range, to_host

__all__ = [
    "chunks_per_call",
    "expression_and_latent_program",
    "last_run",
    "latent_program",
    "normalized_expression_program",
    "run_chunked",
]


@functools.lru_cache(maxsize=128)
def latent_program(config: VAEConfig, mode: str, mc_samples: int = 5000):
    """``run(variables, data, idx, key) -> arrays (n_chunks, batch, n_latent)``.

    ``mode`` is ``"mean"`` (posterior mean; for ``"ln"`` the Monte-Carlo mean of
    ``softmax`` over ``mc_samples`` draws), ``"sample"`` (one transformed draw) or ``"dist"``
    (a pair ``(qz_m, qz_v)``).
    """
    module = VAE(config)
    ln = config.latent_distribution == "ln"

    def run(variables, data: CellData, idx, key):
        def body(_, xs):
            i, idx_i = xs
            batch = gather(data, idx_i)
            k = jax.random.fold_in(key, i)
            inf = module.apply(variables, batch, key=None, method=VAE.inference)
            m, v = inf.qz_m, inf.qz_v
            if mode == "dist":
                return None, (m, v)
            if mode == "sample":
                z = m + jnp.sqrt(v) * jax.random.normal(k, m.shape)
                return None, jax.nn.softmax(z, -1) if ln else z
            if ln:
                eps = jax.random.normal(k, (mc_samples, *m.shape))
                return None, jnp.mean(jax.nn.softmax(m + jnp.sqrt(v) * eps, -1), axis=0)
            return None, m

        _, out = jax.lax.scan(body, None, (jnp.arange(idx.shape[0]), idx))
        return out

    return jax.jit(run)


@functools.lru_cache(maxsize=128)
def normalized_expression_program(config: VAEConfig, n_samples: int, latent_library: bool):
    """``run(variables, data, idx, key, codes, gene_idx, scaling)``.

    ``codes`` is ``(T,)`` int32 batch codes to decode with (-1 keeps each cell's own batch);
    the output is the mean over them of ``px_scale * scaling`` (``px_rate`` when
    ``latent_library``), restricted to ``gene_idx``, of shape ``(n_chunks, [S,] batch, genes)``.
    """
    module = VAE(config)

    def run(variables, data: CellData, idx, key, codes, gene_idx, scaling):
        def body(_, xs):
            i, idx_i = xs
            batch = gather(data, idx_i)

            def one(t):
                k = jax.random.fold_in(jax.random.fold_in(key, i), t)
                k_z, k_drop = jax.random.split(k)
                code = codes[t]
                tb = jnp.where(code >= 0, code, batch.batch_index)

                def fwd(m):
                    inf = m.inference(batch, key=k_z, n_samples=n_samples)
                    return m.generative(inf.z, inf.library, batch._replace(batch_index=tb))

                gen = module.apply(variables, method=fwd, rngs={"dropout": k_drop})
                out = gen.px_rate if latent_library else gen.px_scale * scaling
                return out[..., gene_idx]

            outs = jnp.stack([one(t) for t in range(codes.shape[0])])
            return None, jnp.mean(outs, axis=0)

        _, out = jax.lax.scan(body, None, (jnp.arange(idx.shape[0]), idx))
        return out

    return jax.jit(run)


@functools.lru_cache(maxsize=32)
def expression_and_latent_program(config: VAEConfig, latent_library: bool):
    """``run(variables, data, idx, key, code, gene_idx, scaling) -> (expr, u)``.

    One posterior draw per cell, decoded with batch ``code`` (-1: each cell's own): ``expr``
    is ``px_scale * scaling`` (``px_rate`` when ``latent_library``) restricted to ``gene_idx``,
    ``(n_chunks, batch, genes)``, and ``u`` the Gaussian draw of the latent before any
    ``"ln"`` softmax, ``(n_chunks, batch, n_latent)`` (what importance weights need).
    """
    module = VAE(config)
    ln = config.latent_distribution == "ln"

    def run(variables, data: CellData, idx, key, code, gene_idx, scaling):
        def body(_, xs):
            i, idx_i = xs
            batch = gather(data, idx_i)
            k_z, k_l = jax.random.split(jax.random.fold_in(key, i))
            tb = jnp.where(code >= 0, code, batch.batch_index)

            def fwd(m):
                inf = m.inference(batch, key=None)
                u = inf.qz_m + jnp.sqrt(inf.qz_v) * jax.random.normal(k_z, inf.qz_m.shape)
                library = inf.library
                if inf.ql_m is not None and not config.use_observed_lib_size:
                    eps = jax.random.normal(k_l, inf.ql_m.shape)
                    library = inf.ql_m + jnp.sqrt(inf.ql_v) * eps
                z = jax.nn.softmax(u, axis=-1) if ln else u
                return u, m.generative(z, library, batch._replace(batch_index=tb))

            u, gen = module.apply(variables, method=fwd)
            out = gen.px_rate if latent_library else gen.px_scale * scaling
            return None, (out[..., gene_idx], u)

        _, out = jax.lax.scan(body, None, (jnp.arange(idx.shape[0]), idx))
        return out

    return jax.jit(run)


MAX_CHUNKS_PER_CALL = 64


def bucket(n_chunks: int, limit: int = MAX_CHUNKS_PER_CALL) -> int:
    """Chunks per call: the next power of two, at most ``limit``."""
    return min(limit, 1 << max(n_chunks - 1, 0).bit_length())


def _is_key(a) -> bool:
    return isinstance(a, jax.Array) and jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key)


# Statistics of the latest run_chunked call: device calls, and the most cells / bytes of
# counts moved to the device in one call (host data only).
last_run: dict = {}


def chunks_per_call(n_genes: int, batch_size: int) -> int:
    """Chunks of ``batch_size`` cells per device call under
    ``settings.inference_bytes_per_call``: a power of two, between 1 and
    ``MAX_CHUNKS_PER_CALL``."""
    cells = int(settings.inference_bytes_per_call) // max(4 * int(n_genes), 1)
    chunks = max(1, min(MAX_CHUNKS_PER_CALL, cells // int(batch_size)))
    return 1 << (chunks.bit_length() - 1)


def run_chunked(program, variables, data, indices, batch_size, *args, cell_axis: int = 0):
    """Run ``program`` over ``indices`` in chunks and stitch host arrays back together.

    ``program(variables, data, idx, *args)`` takes ``idx`` of shape ``(n_chunks, batch)``.
    Chunk counts are padded to a power of two and split into calls of at most
    ``MAX_CHUNKS_PER_CALL`` chunks, so a program compiles for a handful of shapes whatever the
    number of cells. When ``data`` lives on the host (:func:`jaxvi.data.to_host`), each
    call moves only its own cells, densified, to the device, and calls are sized so that
    this stays under ``settings.inference_bytes_per_call``: device memory is bounded
    whatever the size of the dataset. Host data may keep its counts on disk
    (:func:`jaxvi.data.backed_cell_data`): each call then reads only its cells. Host data
    with a ``mesh`` has each call's cells sharded over it, each process reading its share.
    When ``args[0]`` is a PRNG key, each call after the first gets ``fold_in(key, call)``.

    Outputs of shape ``(n_chunks, *pre, batch, *post)`` become ``(*pre, n_cells, *post)``
    where ``pre`` has ``cell_axis`` dimensions.
    """
    idx, mask = pad_indices(np.asarray(indices), batch_size)
    n_chunks = idx.shape[0]
    host = is_host(data)
    per_call = chunks_per_call(data.n_genes, batch_size) if host else MAX_CHUNKS_PER_CALL
    stats = {"calls": 0, "max_cells_per_call": 0, "max_bytes_per_call": 0}
    parts = []
    for call, start in enumerate(range(0, n_chunks, per_call)):
        part = idx[start : start + per_call]
        n = part.shape[0]
        padded = np.zeros((bucket(n, per_call), batch_size), np.int32)
        padded[:n] = part
        call_data = data
        if host:
            rows = padded.reshape(-1)
            if data.mesh is None:
                piece = take_rows(data, rows)
                call_data = jax.device_put(piece)
            else:  # this process's share of the piece, sharded over the mesh
                start, stop = local_cell_range(len(rows), data.mesh)
                piece = take_rows(data, rows[start:stop])
                call_data = shard_host_data(piece, len(rows), data.mesh)
            stats["max_cells_per_call"] = max(stats["max_cells_per_call"], padded.size)
            stats["max_bytes_per_call"] = max(stats["max_bytes_per_call"], piece.x.nbytes)
            del piece  # the host copy goes before the next call reads its cells
            padded = np.arange(padded.size, dtype=np.int32).reshape(padded.shape)
        call_args = args
        if call > 0 and args and _is_key(args[0]):
            call_args = (jax.random.fold_in(args[0], call), *args[1:])
        out = program(variables, call_data, jnp.asarray(padded), *call_args)
        parts.append(jax.tree_util.tree_map(lambda a, n=n: to_host(a)[:n], out))
        stats["calls"] += 1
        del call_data, out
    last_run.clear()
    last_run.update(stats)
    out = jax.tree_util.tree_map(lambda *a: np.concatenate(a, axis=0), *parts)
    keep = mask.reshape(-1) > 0

    def stitch(a):
        a = np.moveaxis(a, 0, cell_axis)  # (*pre, n_chunks, batch, *post)
        shape = a.shape
        a = a.reshape(
            *shape[:cell_axis], shape[cell_axis] * shape[cell_axis + 1], *shape[cell_axis + 2 :]
        )
        return np.compress(keep, a, axis=cell_axis)

    return jax.tree_util.tree_map(stitch, out)
