"""Where does jaxvi's training time go? Compile, init, and the parts of one epoch.

Runs on the synthetic data of ``compare_scvi.py`` (10k x 2k by default) and reports:

* ``init``: ``jaxvi.SCVI(adata)`` (first call, includes compiling the init) vs a second
  ``init_variables`` call and ``init_variables`` wrapped in ``jax.jit``;
* ``compile``: trace/lower vs XLA compile of the epoch function (``make_train_epoch``);
* ``epoch``: steady seconds / epoch of the real epoch function, for several batch sizes and for
  the on-device CSR path (``load_sparse_tensor=True``);
* ``parts``: the same ``lax.scan`` over minibatches doing only (a) the gather, (b) the ELBO
  forward, (c) the ELBO value-and-grad, (d) the ZINB log-prob alone forward and
  forward+backward; so the optimizer update and the network costs follow by difference;
* ``likelihood``: the ZINB log-prob alone, as in jaxvi, without the parameter-free
  ``lgamma(x + 1)``, and as a fused ``custom_vjp`` (forward emits closed-form gradients);
* ``optimizer``: the Adam recipe over all parameters vs only those the ELBO uses;
* ``xla_flags``: with ``--xla-flags="A|B"`` each flag set is re-run in a subprocess (XLA
  reads ``XLA_FLAGS`` at start-up) and reports compile and steady epoch time.

Usage::

    python benchmarks/profile_epoch.py                      # all sections, 10k x 2k
    python benchmarks/profile_epoch.py --sections epoch --batch-sizes 128 1024
    python benchmarks/profile_epoch.py --xla-flags="|--xla_cpu_multi_thread_eigen=false"
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

MARKER = "@@PROFILE_EPOCH_RESULT@@ "


def _setup(args):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from compare_scvi import synthetic_adata

    import jaxvi
    from jaxvi.train import PlanConfig, TrainState, make_optimizer, split_indices

    jaxvi.settings.seed = args.seed
    adata = synthetic_adata(args.n_cells, args.n_genes, args.data_seed)
    jaxvi.SCVI.setup_anndata(adata, batch_key="batch")
    t0 = time.perf_counter()
    model = jaxvi.SCVI(adata, n_hidden=128, n_latent=10, n_layers=1)
    init_s = time.perf_counter() - t0
    plan = PlanConfig()
    try:  # jaxvi >= 8ac8e8f: the optimizer skips parameters the ELBO does not use
        from jaxvi.train import init_train_state
    except ImportError:
        init_train_state = None
    if init_train_state is not None:
        engine_model = getattr(model, "model_def", model.module)  # ModelDef engine or older
        _, tx = init_train_state(engine_model, model.variables, plan)

        def fresh_state():
            return init_train_state(engine_model, model.variables, plan)[0]

    else:
        tx = make_optimizer(plan)

        def fresh_state():
            params = jax.tree_util.tree_map(jnp.array, model.variables["params"])
            return TrainState(
                params=params,
                batch_stats=jax.tree_util.tree_map(jnp.array, model.variables["batch_stats"]),
                buffers=dict(model.variables.get("buffers", {})),
                opt_state=tx.init(params),
                step=jnp.zeros((), jnp.int32),
            )

    train_idx, _, _ = split_indices(adata.n_obs, 0.9, batch_size=128, seed=args.seed)
    return {
        "jax": jax,
        "jnp": jnp,
        "np": np,
        "model": model,
        "adata": adata,
        "tx": tx,
        "fresh_state": fresh_state,
        "train_idx": jnp.asarray(np.asarray(train_idx, np.int32)),
        "init_s": init_s,
    }


def _time_epochs(fn, args_fn, n_epochs: int):
    """Compile (first call) and steady seconds / call (median of ``n_epochs`` calls)."""
    import jax

    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args_fn(None)))
    first = time.perf_counter() - t0
    times = []
    for _ in range(n_epochs):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*args_fn(out)))
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"first_call_s": first, "median_s": times[len(times) // 2], "min_s": times[0]}


def section_init(env, args) -> dict:
    jax = env["jax"]
    from jaxvi.module import init_variables

    cfg = env["model"].config
    jitted = jax.jit(init_variables, static_argnums=0)
    key = jax.random.key(0)
    t0 = time.perf_counter()
    jax.block_until_ready(jitted(cfg, key))
    jit_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.block_until_ready(init_variables(cfg, key))
    eager_again = time.perf_counter() - t0
    return {
        "SCVI_constructor_first_s": env["init_s"],
        "init_variables_second_call_s": eager_again,
        "jit_wrapped_init_variables_first_s": jit_first,
    }


def _epoch_setup(env, batch_size: int, sparse: bool):
    import numpy as np

    from jaxvi.train import make_train_epoch

    jax, jnp = env["jax"], env["jnp"]
    model = env["model"]
    n_steps = -(-env["train_idx"].shape[0] // batch_size)
    data = _cells_on_device(env, sparse)
    if hasattr(model, "model_def"):  # the ModelDef engine: the minibatch grid is an argument
        fn = _GridEpoch(make_train_epoch(model.model_def, env["tx"]), n_steps, batch_size)
    else:
        fn = make_train_epoch(model.module, env["tx"], batch_size)
    kl = jnp.full((n_steps,), 0.01, jnp.float32)
    key = jax.random.key(1)
    state0 = env["fresh_state"]()
    args0 = (state0, data, env["train_idx"], key, kl)
    return fn, args0, n_steps, np


class _GridEpoch:
    """The ModelDef engine's epoch with the older call ``(state, data, train_idx, key, kl)``:
    the grid program (``epoch_grid``) then the epoch program; ``lower`` lowers the latter."""

    def __init__(self, epoch, n_steps: int, batch_size: int):
        self.epoch, self.n_steps, self.batch_size = epoch, n_steps, batch_size

    def _args(self, state, data, cells, key, kl):
        from jaxvi.train import epoch_grid

        k, idx, mask = epoch_grid(key, cells, n_steps=self.n_steps, batch_size=self.batch_size)
        return (k, state, data, idx, mask, kl)

    def __call__(self, *args):
        return self.epoch(*self._args(*args))

    def lower(self, *args):
        return self.epoch.lower(*self._args(*args))


def _cells_on_device(env, sparse: bool):
    model = env["model"]
    if hasattr(model, "model_def"):  # the ModelDef engine: jaxvi.data owns placement
        from jaxvi.data import make_source

        adata, registry = env["adata"], model.registry_
        return make_source(adata, registry, purpose="train", load_sparse_tensor=sparse).data
    return model._device_data(env["adata"], sparse)


def section_compile(env, args) -> dict:
    fn, args0, _, _ = _epoch_setup(env, args.batch_sizes[0], False)
    t0 = time.perf_counter()
    lowered = fn.lower(*args0)
    lower_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    lowered.compile()
    compile_s = time.perf_counter() - t0
    hlo = lowered.as_text()
    return {
        "batch_size": args.batch_sizes[0],
        "trace_and_lower_s": lower_s,
        "xla_compile_s": compile_s,
        "stablehlo_lines": hlo.count("\n"),
    }


def section_epoch(env, args) -> dict:
    out = {}
    configs = [(bs, False) for bs in args.batch_sizes]
    if not args.skip_sparse:
        configs.append((args.batch_sizes[0], True))
    n_train = int(env["train_idx"].shape[0])
    for bs, sparse in configs:
        fn, args0, n_steps, _ = _epoch_setup(env, bs, sparse)

        def args_fn(prev, args0=args0):
            if prev is None:
                return args0
            return (prev[0], *args0[1:])

        r = _time_epochs(fn, args_fn, args.epochs)
        r["n_steps"] = n_steps
        r["cells_per_s"] = n_train / r["median_s"]
        r["ms_per_step"] = 1e3 * r["median_s"] / n_steps
        out[f"bs{bs}_{'csr' if sparse else 'dense'}"] = r
        print(f"  epoch bs={bs} {'csr' if sparse else 'dense'}: {json.dumps(r)}", flush=True)
    return out


def section_parts(env, args) -> dict:
    from jaxvi.data import gather
    from jaxvi.likelihoods import zinb_log_prob
    from jaxvi.module import vae_loss

    try:
        from jaxvi.train import variables_of as _variables
    except ImportError:  # before the ModelDef engine
        from jaxvi.train import _variables

    jax, jnp = env["jax"], env["jnp"]
    bs = args.batch_sizes[0]
    model = env["model"]
    module = model.module
    data = _cells_on_device(env, False)
    n_train = int(env["train_idx"].shape[0])
    n_steps = n_train // bs
    idx = env["train_idx"][: n_steps * bs].reshape(n_steps, bs)
    state = env["fresh_state"]()
    variables = _variables(state)
    key = jax.random.key(2)
    g = data.n_genes

    def scan_over(body):
        def run(variables, idx):
            def f(carry, xs):
                i, idx_i = xs
                return carry + body(variables, idx_i, jax.random.fold_in(key, i)), None

            total, _ = jax.lax.scan(f, jnp.float32(0), (jnp.arange(idx.shape[0]), idx))
            return total

        return jax.jit(run)

    def b_gather(v, idx_i, k):
        return jnp.sum(gather(data, idx_i).x)

    def b_forward(v, idx_i, k):
        out, _ = vae_loss(module, v, gather(data, idx_i), key=k, training=True, kl_weight=0.01)
        return out.loss

    def b_grad(v, idx_i, k):
        batch = gather(data, idx_i)

        def loss(p):
            vv = {**v, "params": p}
            return vae_loss(module, vv, batch, key=k, training=True, kl_weight=0.01)[0].loss

        val, grads = jax.value_and_grad(loss)(v["params"])
        return val + sum(jnp.sum(x) for x in jax.tree_util.tree_leaves(grads))

    lik_mu = jnp.full((bs, g), 2.0)
    lik_theta = jnp.full((g,), 3.0)
    lik_zi = jnp.full((bs, g), -2.0)

    def b_zinb_fwd(v, idx_i, k):
        x = gather(data, idx_i).x
        return jnp.sum(zinb_log_prob(x, lik_mu * (1 + 1e-3 * x), lik_theta, lik_zi))

    def b_zinb_grad(v, idx_i, k):
        x = gather(data, idx_i).x

        def f(mu, theta, zi):
            return jnp.sum(zinb_log_prob(x, mu, theta, zi))

        val, (gm, gt, gz) = jax.value_and_grad(f, argnums=(0, 1, 2))(lik_mu, lik_theta, lik_zi)
        return val + jnp.sum(gm) + jnp.sum(gt) + jnp.sum(gz)

    parts = {
        "gather": b_gather,
        "elbo_forward": b_forward,
        "elbo_value_and_grad": b_grad,
        "zinb_logprob_forward": b_zinb_fwd,
        "zinb_logprob_value_and_grad": b_zinb_grad,
    }
    out = {"batch_size": bs, "n_steps": n_steps}
    for name, body in parts.items():
        fn = scan_over(body)
        r = _time_epochs(fn, lambda prev, fn=fn: (variables, idx), args.epochs)
        r["ms_per_step"] = 1e3 * r["median_s"] / n_steps
        out[name] = r
        print(f"  part {name}: {json.dumps(r)}", flush=True)
    return out


# ------------------------------------------------------------ likelihood variants
def _zinb_variant(x, mu, theta, zi, eps=1e-8, with_lgamma_x1=True):
    """jaxvi's ``zinb_log_prob`` with the parameter-free ``lgamma(x + 1)`` optional."""
    import jax
    import jax.numpy as jnp
    from jax.scipy.special import gammaln

    softplus_neg = jax.nn.softplus(-zi)
    log_theta_mu_eps = jnp.log(theta + mu + eps)
    pi_theta_log = -zi + theta * (jnp.log(theta + eps) - log_theta_mu_eps)
    case_zero = jax.nn.softplus(pi_theta_log) - softplus_neg
    case_non_zero = (
        -softplus_neg
        + pi_theta_log
        + x * (jnp.log(mu + eps) - log_theta_mu_eps)
        + gammaln(x + theta)
        - gammaln(theta)
    )
    if with_lgamma_x1:
        case_non_zero = case_non_zero - gammaln(x + 1.0)
    is_zero = (x < eps).astype(case_zero.dtype)
    is_pos = (x > eps).astype(case_zero.dtype)
    return is_zero * case_zero + is_pos * case_non_zero


def _unbroadcast(g, shape):
    while g.ndim > len(shape):
        g = g.sum(0)
    for i, (a, b) in enumerate(zip(g.shape, shape, strict=True)):
        if b == 1 and a != 1:
            g = g.sum(i, keepdims=True)
    return g


def make_zinb_fused(with_lgamma_x1: bool = True, eps: float = 1e-8):
    """ZINB log-prob with a ``custom_vjp`` whose forward pass also emits the closed-form
    gradients (one fused elementwise pass; the backward pass is three multiplies)."""
    import jax
    import jax.numpy as jnp
    from jax.scipy.special import digamma, gammaln

    def fwd(x, mu, theta, zi):
        sp_neg = jax.nn.softplus(-zi)
        tme = theta + mu + eps
        log_tme = jnp.log(tme)
        log_theta = jnp.log(theta + eps)
        ptl = -zi + theta * (log_theta - log_tme)
        case_zero = jax.nn.softplus(ptl) - sp_neg
        case_nz = (
            -sp_neg + ptl + x * (jnp.log(mu + eps) - log_tme) + gammaln(x + theta) - gammaln(theta)
        )
        if with_lgamma_x1:
            case_nz = case_nz - gammaln(x + 1.0)
        is_zero, is_pos = x < eps, x > eps
        out = jnp.where(is_zero, case_zero, jnp.where(is_pos, case_nz, 0.0))
        sig_ptl, sig_negz = jax.nn.sigmoid(ptl), jax.nn.sigmoid(-zi)
        dptl_da = log_theta - log_tme + theta / (theta + eps) - theta / tme
        dptl_dm = -theta / tme
        dz = jnp.where(is_zero, sig_negz - sig_ptl, jnp.where(is_pos, sig_negz - 1.0, 0.0))
        dnz_da = dptl_da - x / tme + digamma(x + theta) - digamma(theta)
        da = jnp.where(is_zero, sig_ptl * dptl_da, jnp.where(is_pos, dnz_da, 0.0))
        dnz_dm = dptl_dm + x / (mu + eps) - x / tme
        dm = jnp.where(is_zero, sig_ptl * dptl_dm, jnp.where(is_pos, dnz_dm, 0.0))
        return out, (dm, da, dz, jnp.shape(mu), jnp.shape(theta), jnp.shape(zi))

    @jax.custom_vjp
    def zinb(x, mu, theta, zi):
        return fwd(x, mu, theta, zi)[0]

    def bwd(res, g):
        dm, da, dz, sm, st, sz = res
        return (
            None,
            _unbroadcast(g * dm, sm),
            _unbroadcast(g * da, st),
            _unbroadcast(g * dz, sz),
        )

    zinb.defvjp(fwd, bwd)
    return zinb


def section_likelihood(env, args) -> dict:
    """ZINB log-prob alone on (batch, genes) counts of the real data, forward and
    forward+backward: jaxvi's, without ``lgamma(x + 1)``, and with a fused ``custom_vjp``."""
    import numpy as np

    from jaxvi.data import gather
    from jaxvi.likelihoods import zinb_log_prob

    jax, jnp = env["jax"], env["jnp"]
    bs = args.batch_sizes[0]
    data = _cells_on_device(env, False)
    n_steps = int(env["train_idx"].shape[0]) // bs
    idx = env["train_idx"][: n_steps * bs].reshape(n_steps, bs)
    rng = np.random.default_rng(0)
    g = data.n_genes
    mu = jnp.asarray(rng.gamma(2.0, 1.0, (bs, g)).astype(np.float32))
    theta = jnp.asarray(rng.gamma(2.0, 1.0, (g,)).astype(np.float32))
    zi = jnp.asarray(rng.normal(-2.0, 1.0, (bs, g)).astype(np.float32))
    fused = make_zinb_fused(True)
    fused_nox1 = make_zinb_fused(False)
    variants = {
        "jaxvi_zinb_log_prob": zinb_log_prob,
        "without_lgamma_x1": lambda x, m, t, z: _zinb_variant(x, m, t, z, with_lgamma_x1=False),
        "custom_vjp_fused": fused,
        "custom_vjp_fused_without_lgamma_x1": fused_nox1,
    }
    x0 = gather(data, idx[0]).x
    ref_val, ref_grads = jax.value_and_grad(
        lambda m, t, z: jnp.sum(zinb_log_prob(x0, m, t, z)), argnums=(0, 1, 2)
    )(mu, theta, zi)
    out = {"batch_size": bs, "n_steps": n_steps}
    for name, f in variants.items():
        loss = lambda x, m, t, z, f=f: jnp.sum(f(x, m, t, z))  # noqa: E731
        entry = {}
        val, grads = jax.value_and_grad(loss, argnums=(1, 2, 3))(x0, mu, theta, zi)
        entry["grad_max_rel_err_vs_jaxvi"] = max(
            float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
            for a, b in zip(grads, ref_grads, strict=True)
        )
        entry["value_diff_vs_jaxvi"] = float(val - ref_val)
        for mode in ("forward", "value_and_grad"):

            def body(c, idx_i, mode=mode, loss=loss):
                x = gather(data, idx_i).x
                if mode == "forward":
                    return c + loss(x, mu, theta, zi), None
                v, gs = jax.value_and_grad(loss, argnums=(1, 2, 3))(x, mu, theta, zi)
                return c + v + sum(jnp.sum(a) for a in gs), None

            run = jax.jit(lambda idx, body=body: jax.lax.scan(body, jnp.float32(0), idx)[0])
            r = _time_epochs(run, lambda prev, run=run: (idx,), args.epochs)
            entry[f"{mode}_ms_per_step"] = 1e3 * r["median_s"] / n_steps
        out[name] = entry
        print(f"  likelihood {name}: {json.dumps(entry)}", flush=True)
    return out


def section_optimizer(env, args) -> dict:
    """The Adam recipe over one epoch of steps: unmasked over all parameters, unmasked over
    only those the ELBO uses for this config (``l_encoder`` and ``decoder.px_r_decoder`` get
    zero gradients with observed library size and gene dispersion), and jaxvi's own optimizer
    (masked since commit 8ac8e8f) over all parameters."""
    import optax

    from jaxvi.train import PlanConfig, make_optimizer

    jax, jnp = env["jax"], env["jnp"]
    plain = make_optimizer(PlanConfig())
    params = env["model"].variables["params"]
    n_steps = -(-int(env["train_idx"].shape[0]) // args.batch_sizes[0])

    def used_only(p):
        p = dict(p)
        p.pop("l_encoder", None)
        dec = dict(p["decoder"])
        dec.pop("px_r_decoder", None)
        p["decoder"] = dec
        return p

    def run(params, tx):
        state = tx.init(params)

        def body(carry, i):
            p, s = carry
            grads = jax.tree_util.tree_map(lambda a: a * 1e-3 + 1e-4 * i, p)
            updates, s = tx.update(grads, s, p)
            return (optax.apply_updates(p, updates), s), None

        (p, _), _ = jax.lax.scan(body, (params, state), jnp.arange(n_steps, dtype=jnp.float32))
        return p

    out = {"n_steps": n_steps}
    cases = (
        ("all_params", params, plain),
        ("used_params_only", used_only(params), plain),
        ("jaxvi_optimizer_all_params", params, env["tx"]),
    )
    for name, p, tx in cases:
        fn = jax.jit(functools.partial(run, tx=tx))
        r = _time_epochs(fn, lambda prev, fn=fn, p=p: (p,), args.epochs)
        out[name] = {
            "n_params": int(sum(a.size for a in jax.tree_util.tree_leaves(p))),
            "ms_per_step": 1e3 * r["median_s"] / n_steps,
        }
        print(f"  optimizer {name}: {json.dumps(out[name])}", flush=True)
    return out


def run_sections(args) -> dict:
    env = _setup(args)
    res = {"sections": {}}
    for name in args.sections:
        print(f"[profile_epoch] section {name}", flush=True)
        with C.LoadProbe() as probe:
            res["sections"][name] = globals()[f"section_{name}"](env, args)
        res["sections"][name]["load"] = probe.result
    return res


def run_flag_sets(args) -> dict:
    out = {}
    for flags in args.xla_flags.split("|"):
        flags = flags.strip()
        env = dict(os.environ)
        env["XLA_FLAGS"] = flags
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--child",
            "--sections",
            "compile",
            "epoch",
            "--skip-sparse",
            "--epochs",
            str(args.epochs),
            "--n-cells",
            str(args.n_cells),
            "--n-genes",
            str(args.n_genes),
            "--batch-sizes",
            *[str(b) for b in args.batch_sizes],
        ]
        print(f"[profile_epoch] XLA_FLAGS={flags!r}", flush=True)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        for line in proc.stdout.splitlines():
            if line.startswith(MARKER):
                out[flags or "<default>"] = json.loads(line[len(MARKER) :])
                break
        else:
            out[flags or "<default>"] = {"error": proc.stderr[-2000:]}
        print(json.dumps(out[flags or "<default>"], indent=1)[:2000], flush=True)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--sections",
        nargs="+",
        default=["init", "compile", "epoch", "parts", "likelihood", "optimizer"],
        choices=["init", "compile", "epoch", "parts", "likelihood", "optimizer"],
    )
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 256, 1024])
    p.add_argument("--epochs", type=int, default=5, help="timed epochs per configuration")
    p.add_argument("--n-cells", type=int, default=10_000)
    p.add_argument("--n-genes", type=int, default=2_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--skip-sparse", action="store_true")
    p.add_argument(
        "--xla-flags",
        default=None,
        help='XLA_FLAGS sets to compare, separated by "|" ("" = default), e.g. '
        '--xla-flags="|--xla_cpu_use_thunk_runtime=false"',
    )
    p.add_argument("--out", default=None, help="save JSON here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        res = run_sections(args)
        print(MARKER + json.dumps(res, default=C._json_default), flush=True)
        return
    payload = {
        "benchmark": "profile_epoch",
        "started_utc": C.utc_timestamp(),
        "machine": C.machine_info(with_jax=True),
        "versions": C.versions(),
        "git": C.git_info(),
        "settings": vars(args),
    }
    if args.xla_flags is not None:
        payload["xla_flags"] = run_flag_sets(args)
    else:
        payload.update(run_sections(args))
    payload["git_end"] = C.git_info()
    if args.out:
        C.write_json(Path(args.out), payload)
        print(f"saved {args.out}")
    else:
        print(json.dumps(payload.get("sections", payload.get("xla_flags")), indent=1))


if __name__ == "__main__":
    main()
