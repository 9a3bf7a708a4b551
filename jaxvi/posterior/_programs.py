"""The query programs: jitted ``run(key, variables, data, idx, *args)`` for
:func:`jaxvi.posterior.run_query`.

Each is a ``lax.scan`` over chunks of cell indices ``idx`` of shape ``(n_chunks, batch)``
that runs the model in evaluation mode (running batch-norm statistics, no dropout); chunk
``i`` draws from ``fold_in(key, i)``. Programs are cached per model (a Flax module compares
equal for equal configurations; a :class:`~jaxvi.module.ModelDef` per object), so repeated
queries with the same shapes do not recompile.

:func:`elbo_terms_program` needs only a :class:`~jaxvi.module.ModelDef`; the others are the
scVI VAE's (:class:`~jaxvi.module.VAE`: its ``inference`` and ``generative`` methods).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jaxvi.data import COVARIATES, CellData, Minibatch, gather
from jaxvi.likelihoods import PxParams, get_likelihood
from jaxvi.module import VAE, ModelDef
from jaxvi.train import make_evaluate

__all__ = [
    "denoised_program",
    "elbo_terms_program",
    "expression_and_latent_program",
    "library_program",
    "likelihood_program",
    "log_weight_program",
    "marginal_ll_program",
    "normal_log_density",
    "latent_program",
    "normalized_expression_program",
    "predictive_program",
]

_LOG_2PI = math.log(2.0 * math.pi)


def normal_log_density(x, mean, var):
    """Elementwise log density of N(mean, var) at ``x``."""
    return -0.5 * (jnp.square(x - mean) / var + jnp.log(var) + _LOG_2PI)


def _scan_chunks(body, idx):
    """``lax.scan`` of ``body(i, idx_i) -> out`` over the chunks of ``idx``; stacked outputs."""

    def step(_, xs):
        return None, body(*xs)

    _, out = jax.lax.scan(step, None, (jnp.arange(idx.shape[0]), idx))
    return out


def _decode(m: VAE, batch, key, n_samples: int, code):
    """px of ``n_samples`` posterior draws, decoded in batch ``code`` (-1: the cell's own)."""
    inf = m.inference(batch, key=key, n_samples=n_samples)
    tb = jnp.where(code >= 0, code, batch.batch_index)
    return m.generative(inf.z, inf.library, batch._replace(batch_index=tb))


@functools.lru_cache(maxsize=32)
def elbo_terms_program(model_def: ModelDef):
    """``run(key, variables, data, idx) -> {term: (n_chunks, batch)}``: the named terms of
    the model's loss per cell (KL weight 1), one draw per cell (the posterior mean when
    ``key`` is None), as scvi-tools' ``get_elbo`` and ``get_reconstruction_error``. A scalar
    term (one value per minibatch) is given to each cell of its chunk."""
    evaluate = make_evaluate(model_def)

    def run(key, variables, data: CellData, idx):
        terms = evaluate(key, variables, data, idx)[1]
        per_cell = {k: v[:, None] if v.ndim == 1 else v for k, v in terms.items()}
        return {k: jnp.broadcast_to(v, idx.shape) for k, v in per_cell.items()}

    return jax.jit(run)


@functools.lru_cache(maxsize=128)
def latent_program(module: VAE, mode: str, mc_samples: int = 5000):
    """``run(key, variables, data, idx) -> arrays (n_chunks, batch, n_latent)``.

    ``mode`` is ``"mean"`` (posterior mean; for ``"ln"`` the Monte-Carlo mean of
    ``softmax`` over ``mc_samples`` draws), ``"sample"`` (one transformed draw) or ``"dist"``
    (a pair ``(qz_m, qz_v)``).
    """
    ln = module.config.latent_distribution == "ln"

    def run(key, variables, data: CellData, idx):
        def body(i, idx_i):
            batch = gather(data, idx_i)
            k = jax.random.fold_in(key, i)
            inf = module.apply(variables, batch, key=None, method=VAE.inference)
            m, v = inf.qz_m, inf.qz_v
            if mode == "dist":
                return m, v
            if mode == "sample":
                z = m + jnp.sqrt(v) * jax.random.normal(k, m.shape)
                return jax.nn.softmax(z, -1) if ln else z
            if ln:
                eps = jax.random.normal(k, (mc_samples, *m.shape))
                return jnp.mean(jax.nn.softmax(m + jnp.sqrt(v) * eps, -1), axis=0)
            return m

        return _scan_chunks(body, idx)

    return jax.jit(run)


@functools.lru_cache(maxsize=128)
def normalized_expression_program(module: VAE, n_samples: int, latent_library: bool):
    """``run(key, variables, data, idx, codes, gene_idx, scaling)``.

    ``codes`` is ``(T,)`` int32 batch codes to decode with (-1 keeps each cell's own batch);
    the output is the mean over them of ``px_scale * scaling`` (``px_rate`` when
    ``latent_library``), restricted to ``gene_idx``, of shape ``(n_chunks, [S,] batch, genes)``.
    """

    def run(key, variables, data: CellData, idx, codes, gene_idx, scaling):
        def body(i, idx_i):
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
            return jnp.mean(outs, axis=0)

        return _scan_chunks(body, idx)

    return jax.jit(run)


@functools.lru_cache(maxsize=32)
def expression_and_latent_program(module: VAE, latent_library: bool):
    """``run(key, variables, data, idx, code, gene_idx, scaling) -> (expr, u)``.

    One posterior draw per cell, decoded with batch ``code`` (-1: each cell's own): ``expr``
    is ``px_scale * scaling`` (``px_rate`` when ``latent_library``) restricted to ``gene_idx``,
    ``(n_chunks, batch, genes)``, and ``u`` the Gaussian draw of the latent before any
    ``"ln"`` softmax, ``(n_chunks, batch, n_latent)`` (what importance weights need).
    """
    config = module.config
    ln = config.latent_distribution == "ln"

    def run(key, variables, data: CellData, idx, code, gene_idx, scaling):
        def body(i, idx_i):
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
            return out[..., gene_idx], u

        return _scan_chunks(body, idx)

    return jax.jit(run)


@functools.lru_cache(maxsize=64)
def likelihood_program(module: VAE, n_samples: int):
    """``run(key, variables, data, idx) -> {name: (n_chunks, [S,] batch, genes)}``."""
    lik = get_likelihood(module.config.gene_likelihood)

    def run(key, variables, data: CellData, idx):
        def body(i, idx_i):
            batch = gather(data, idx_i)

            def fwd(m: VAE):
                inf = m.inference(batch, key=jax.random.fold_in(key, i), n_samples=n_samples)
                return m.generative(inf.z, inf.library, batch)

            p = module.apply(variables, method=fwd).px_params()
            out = {"mean": p.mu}
            if lik.uses_zi_logits:
                out["dropout"] = jnp.broadcast_to(jax.nn.sigmoid(p.zi_logits), p.mu.shape)
            if lik.uses_theta:
                out["dispersions"] = jnp.broadcast_to(p.theta, p.mu.shape)
            return out

        return _scan_chunks(body, idx)

    return jax.jit(run)


@functools.lru_cache(maxsize=64)
def predictive_program(module: VAE, n_samples: int):
    """``run(key, variables, data, idx, codes, gene_idx) -> (n_chunks, batch, genes[, S])``.

    Counts drawn from p(x | z, l) with z, l ~ q(. | x), averaged over the batch ``codes``.
    """
    lik = get_likelihood(module.config.gene_likelihood)

    def run(key, variables, data: CellData, idx, codes, gene_idx):
        def body(i, idx_i):
            batch = gather(data, idx_i)

            def draw(t_code):
                t, code = t_code
                k_inf, k_x = jax.random.split(jax.random.fold_in(jax.random.fold_in(key, i), t))
                gen = module.apply(
                    variables, method=lambda m: _decode(m, batch, k_inf, n_samples, code)
                )
                p = PxParams(*(None if a is None else a[..., gene_idx] for a in gen.px_params()))
                return lik.sample(k_x, p)

            # One traced copy of the sampler whatever the number of batches averaged over.
            x = jnp.mean(jax.lax.map(draw, (jnp.arange(codes.shape[0]), codes)), axis=0)
            return x if n_samples == 1 else jnp.moveaxis(x, 0, -1)

        return _scan_chunks(body, idx)

    return jax.jit(run)


@functools.lru_cache(maxsize=64)
def marginal_ll_program(module: VAE, per_pass: int):
    """``run(key, variables, data, idx, n_mc) -> (n_chunks, batch)`` importance-sampled
    ``log p(x)``: a running logsumexp over ``ceil(n_mc / per_pass)`` passes of ``per_pass``
    draws, of which the first ``n_mc`` count (``n_mc`` is traced: one compilation serves
    every sample count)."""
    config = module.config
    lik = get_likelihood(config.gene_likelihood)
    ln = config.latent_distribution == "ln"
    latent_library = not config.use_observed_lib_size

    def run(key, variables, data: CellData, idx, n_mc):
        def body(i, idx_i):
            batch = gather(data, idx_i)
            inf = module.apply(variables, batch, key=None, method=VAE.inference)
            qz_m, qz_v = inf.qz_m, inf.qz_v
            n_cells = qz_m.shape[0]
            if latent_library:
                pl_m, pl_v = module.apply(variables, batch.batch_index, method=VAE.library_prior)
            k_chunk = jax.random.fold_in(key, i)

            def one_pass(j, lse):
                k_z, k_l = jax.random.split(jax.random.fold_in(k_chunk, j))
                eps = jax.random.normal(k_z, (per_pass, *qz_m.shape))
                u = qz_m + jnp.sqrt(qz_v) * eps
                # log p(z) - log q(z | x), both at the Gaussian draw u.
                log_w = jnp.sum(
                    normal_log_density(u, 0.0, 1.0) - normal_log_density(u, qz_m, qz_v), -1
                )
                if latent_library:
                    library = inf.ql_m + jnp.sqrt(inf.ql_v) * jax.random.normal(
                        k_l, (per_pass, *inf.ql_m.shape)
                    )
                    log_w += jnp.sum(
                        normal_log_density(library, pl_m, pl_v)
                        - normal_log_density(library, inf.ql_m, inf.ql_v),
                        -1,
                    )
                else:
                    library = jnp.broadcast_to(inf.library, (per_pass, n_cells, 1))
                z = jax.nn.softmax(u, axis=-1) if ln else u
                gen = module.apply(variables, z, library, batch, method=VAE.generative)
                log_w += jnp.sum(lik.log_prob(batch.x, gen.px_params()), -1)
                used = (j * per_pass + jnp.arange(per_pass)) < n_mc
                log_w = jnp.where(used[:, None], log_w, -jnp.inf)
                return jnp.logaddexp(lse, jax.nn.logsumexp(log_w, axis=0))

            n_passes = (n_mc + per_pass - 1) // per_pass
            lse0 = jnp.full((n_cells,), -jnp.inf, qz_m.dtype)
            lse = jax.lax.fori_loop(0, n_passes, one_pass, lse0)
            return lse - jnp.log(n_mc.astype(lse.dtype))

        return _scan_chunks(body, idx)

    return jax.jit(run)


@functools.lru_cache(maxsize=64)
def library_program(module: VAE, give_mean: bool):
    """``run(key, variables, data, idx) -> (n_chunks, batch, 1)`` library sizes (counts)."""

    def run(key, variables, data: CellData, idx):
        def body(i, idx_i):
            batch = gather(data, idx_i)
            k = None if give_mean else jax.random.fold_in(key, i)
            inf = module.apply(variables, batch, key=k, method=VAE.inference)
            if give_mean:  # mean of LogNormal(ql_m, sqrt(ql_v))
                return jnp.exp(inf.ql_m + 0.5 * inf.ql_v)
            return jnp.exp(inf.library)

        return _scan_chunks(body, idx)

    return jax.jit(run)


@functools.lru_cache(maxsize=64)
def denoised_program(module: VAE, n_samples: int):
    """``run(key, variables, data, idx, code, size_factor) -> (n_chunks, S, batch, genes)``.

    Gamma(theta, rate theta / (size_factor * px_scale)) draws, one per z draw (scVI's
    "denoised" expression); ``size_factor * px_scale`` for likelihoods without a Gamma-Poisson
    dispersion.
    """
    gamma = module.config.gene_likelihood in ("nb", "zinb", "zinb-gene")

    def run(key, variables, data: CellData, idx, code, size_factor):
        def body(i, idx_i):
            batch = gather(data, idx_i)
            k_inf, k_g = jax.random.split(jax.random.fold_in(key, i))
            gen = module.apply(
                variables, method=lambda m: _decode(m, batch, k_inf, n_samples, code)
            )
            rate = size_factor * gen.px_scale
            if n_samples == 1:
                rate = rate[None]
            if not gamma:
                return rate
            theta = jnp.broadcast_to(jnp.exp(gen.px_r), rate.shape)
            return jax.random.gamma(k_g, theta) * (rate / theta)

        return _scan_chunks(body, idx)

    return jax.jit(run)


@functools.lru_cache(maxsize=32)
def log_weight_program(module: VAE):
    """``run(key, variables, data, idx, u, code, qz_m, qz_v, qz_real, x_g, log_px_g, real_g)``
    for importance weights (:mod:`jaxvi.posterior`).

    ``data`` holds the covariates of the cells the draws belong to (their counts are not
    read) and ``u`` ``(n_chunks, batch, n_latent)`` the draws (pre-softmax), chunked like
    ``idx``; ``qz_m``, ``qz_v`` ``(A, n_latent)`` are q(z | x_a) of all anchors with
    ``qz_real`` ``(A,)`` (1 for real anchors); ``x_g`` ``(A_g, genes)`` are the counts of
    one group of anchors with ``log_px_g`` ``(A_g,)`` and ``real_g`` ``(A_g,)``. Returns
    ``(log p(z) - logsumexp_a log q(z | x_a), logsumexp_{a in group} [log p(x_a | z, l_a)
    - log p(x_a)])``, each ``(n_chunks, batch)``. ``key`` is not used.
    """
    config = module.config
    lik = get_likelihood(config.gene_likelihood)
    ln = config.latent_distribution == "ln"

    def run(key, variables, data, idx, u, code, qz_m, qz_v, qz_real, x_g, log_px_g, real_g):
        del key
        lib_g = jnp.sum(x_g, axis=-1)  # (A_g,)

        def body(_, xs):
            idx_i, u_i = xs
            cells = gather(data, idx_i)
            batch = Minibatch(x=None, **{k: getattr(cells, k) for k in COVARIATES})
            tb = jnp.where(code >= 0, code, batch.batch_index)
            z = jax.nn.softmax(u_i, axis=-1) if ln else u_i
            library = jnp.zeros((z.shape[0], 1), z.dtype)
            gen = module.apply(
                variables, z, library, batch._replace(batch_index=tb), method=VAE.generative
            )
            params = gen.px_params()
            log_pz = jnp.sum(normal_log_density(u_i, 0.0, 1.0), -1)  # (B,)
            log_qz = jnp.sum(normal_log_density(u_i[:, None, :], qz_m, qz_v), -1)  # (B, A)
            log_qz = jnp.where(qz_real > 0, log_qz, -jnp.inf)

            def per_anchor(xl):
                x, lib = xl
                p = params._replace(mu=gen.px_scale * lib)
                return jnp.sum(lik.log_prob(x[None, :], p), -1)  # (B,)

            log_px_z = jax.lax.map(per_anchor, (x_g, lib_g), batch_size=8).T  # (B, A_g)
            terms = jnp.where(real_g > 0, log_px_z - log_px_g[None, :], -jnp.inf)
            prior = log_pz - jax.nn.logsumexp(log_qz, axis=1)
            return None, (prior, jax.nn.logsumexp(terms, axis=1))

        _, out = jax.lax.scan(body, None, (idx, u))
        return out

    return jax.jit(run)
