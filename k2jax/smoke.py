"""`k2-smoke`: the 1T K2 Thinking built abstractly (no weights), then a tiny K2 run end to end."""
from __future__ import annotations

import time


def main(argv=None) -> None:
  from absl import flags  # noqa: PLC0415
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  from k2jax import model as model_lib, params, presets, report, sharding  # noqa: PLC0415

  FLAGS = flags.FLAGS
  mesh = sharding.mesh_from_flags()
  moe_impl = sharding.moe_impl_from_flags(mesh)
  big = presets.get(FLAGS.preset)
  t0 = time.perf_counter()
  abstract = params.abstract_params(big, jnp.bfloat16)
  print(f"built {big.name} abstractly in {time.perf_counter() - t0:.1f}s: {params.count(abstract):,} parameters")
  print(report.format_report(big))

  tiny = presets.get(FLAGS.tiny_preset)
  sharding.check_mesh_fits_model(mesh, tiny)
  p = sharding.init_params_sharded(tiny, jax.random.key(FLAGS.seed), jnp.float32, mesh)
  tokens = jax.random.randint(jax.random.key(FLAGS.seed + 1), (FLAGS.batch, FLAGS.seq_len), 0, tiny.vocab_size)
  with sharding.use_mesh(mesh):
    out = jax.jit(lambda p, t: model_lib.forward(p, tiny, t, moe_impl=moe_impl))(p, tokens)
  logp = jax.nn.log_softmax(out.logits[:, :-1])
  nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean()
  load = np.asarray(out.expert_load)
  print(f"\n{tiny.name}: {params.count(p):,} parameters; logits {tuple(out.logits.shape)}; "
        f"next-token loss {float(nll):.3f} (uniform would be {np.log(tiny.vocab_size):.3f})")
  print(f"max attention logit per layer: {np.round(np.asarray(out.max_attn_logits['moe_layers']).max(-1), 3)}")
  print(f"tokens per expert (MoE layer 0): {load[0].astype(int).tolist()}")


def run(argv=None) -> None:
  from k2jax import cli  # noqa: PLC0415
  from absl import flags  # noqa: PLC0415

  flags.DEFINE_string("preset", "k2_thinking", "Large preset to build abstractly.")
  flags.DEFINE_string("tiny_preset", "tiny", "Small preset to run.")
  flags.DEFINE_integer("batch", 2, "Batch size of the tiny run.", lower_bound=1)
  flags.DEFINE_integer("seq_len", 32, "Sequence length of the tiny run (a next-token loss needs 2).", lower_bound=2)
  flags.DEFINE_integer("seed", 0, "Random seed.")
  from k2jax import sharding  # noqa: PLC0415
  sharding.define_mesh_flag()
  cli.run(main, [__name__, "k2jax.sharding"], argv)


if __name__ == "__main__":
  run()
