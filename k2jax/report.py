"""Parameter and byte counts per component, from `jax.eval_shape` of the real parameter tree."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from k2jax import int4, params as params_lib
from k2jax.config import K2Config

GIB = 1 << 30  # the one byte unit of k2-params and k2-plan (device memory is sold in GiB)
INT4_BYTES_PER_PARAM = 0.5 + 2 / int4.GROUP  # 4-bit values plus one bf16 scale per group

# Component of each leaf, by the first matching path fragment.
_COMPONENTS = (
    ("embed_vd", "embedding"), ("lm_head_dv", "lm_head"), ("/experts/", "routed experts"),
    ("/shared/", "shared experts"), ("/router", "router"), ("/mlp/", "dense MLP"), ("/attn/", "attention"),
    ("norm", "norms"),
)


@dataclasses.dataclass
class Row:
  component: str
  params: int
  bytes_bf16: int
  bytes_serving: int  # routed experts INT4 when the config says so, else bf16; fp32 router bias


def _component(path: str) -> str:
  for frag, name in _COMPONENTS:
    if frag in path:
      return name
  return "other"


def param_report(c: K2Config) -> list[Row]:
  tree = params_lib.abstract_params(c, jnp.bfloat16)
  rows: dict[str, Row] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    p = params_lib.path_str(path)
    name = _component(p)
    n = int(np.prod(leaf.shape, dtype=np.int64))
    b16 = n * leaf.dtype.itemsize
    serve = int(n * INT4_BYTES_PER_PARAM) if (name == "routed experts" and c.expert_quant == "int4") else b16
    row = rows.setdefault(name, Row(name, 0, 0, 0))
    row.params += n
    row.bytes_bf16 += b16
    row.bytes_serving += serve
  order = [name for _, name in _COMPONENTS]
  return sorted(rows.values(), key=lambda r: order.index(r.component) if r.component in order else 99)


def activated_params(c: K2Config, rows: list[Row] | None = None) -> int:
  """Parameters touched per token (the whole input embedding counted, as in the usual convention)."""
  rows = param_report(c) if rows is None else rows
  total = sum(r.params for r in rows)
  routed = next((r.params for r in rows if r.component == "routed experts"), 0)
  return total - routed + routed * c.num_experts_per_tok // c.n_routed_experts


def format_report(c: K2Config) -> str:
  rows = param_report(c)
  total = Row("total", sum(r.params for r in rows), sum(r.bytes_bf16 for r in rows),
              sum(r.bytes_serving for r in rows))
  serve_label = "serving (INT4 experts)" if c.expert_quant == "int4" else "serving"
  lines = [f"{c.name}: {c.num_hidden_layers} layers ({c.num_dense_layers} dense, {c.num_moe_layers} MoE), "
           f"{c.n_routed_experts} experts top-{c.num_experts_per_tok} + {c.n_shared_experts} shared",
           f"{'component':<16}{'parameters':>20}{'share':>8}{'bf16 GiB':>11}{serve_label + ' GiB':>30}"]
  for r in rows + [total]:
    lines.append(f"{r.component:<16}{r.params:>20,}{100 * r.params / total.params:>7.1f}%"
                 f"{r.bytes_bf16 / GIB:>11.2f}{r.bytes_serving / GIB:>30.2f}")
  lines.append(f"activated per token: {activated_params(c, rows):,}")
  return "\n".join(lines)


def run(argv=None):
  """`k2-params`: the parameter table of a preset or an HF config.json."""
  from k2jax import cli  # noqa: PLC0415
  from absl import flags  # noqa: PLC0415

  flags.DEFINE_string("preset", "k2_thinking", "Model preset name.")
  flags.DEFINE_string("hf_config", None, "Path to an HF config.json (or its folder); overrides --preset.")

  def main(_):
    from k2jax import presets  # noqa: PLC0415
    c = K2Config.from_hf(flags.FLAGS.hf_config) if flags.FLAGS.hf_config else presets.get(flags.FLAGS.preset)
    print(format_report(c))

  cli.run(main, [__name__], argv)
