"""The hypothesis strategy that draws layouts (hypothesis is imported only here: ranks never need it)."""

from __future__ import annotations

from toy_models.generated.layout import (
    BUFFER_DTYPES,
    droppable_keys,
    holds_extra,
    module_order,
    tensor_specs,
    validate,
)

MAX_DIM = 7  # shape dims 1..MAX_DIM: odd ones shard unevenly over 2 ranks, 1 leaves a rank an empty shard


def layouts(rare: float = 0.3):
    """Hypothesis strategy for a layout (hypothesis is imported only here: ranks never need it).

    `rare` is the chance a layout uses each feature that breaks the stock stack (persistent
    buffers, forgotten buffers, a shared buffer, tensors on the root module), so a batch keeps
    plenty of layouts the stock stack must load cleanly. Every choice shrinks towards the plain
    case: fewer modules and tensors, parameters before buffers, float32, 1-element dims.
    Parameters are never 0-dim: FSDP2's fully_shard refuses scalar parameters outright.
    Shared buffers are non-persistent: save_pretrained refuses a shared persistent buffer.
    """
    from hypothesis import strategies as st

    # shrinks to False (the first element); True about `rare` of the time
    chance = st.sampled_from([False] * round(10 * (1 - rare)) + [True] * round(10 * rare))

    @st.composite
    def draw_layout(draw):
        allow = {f: draw(chance) for f in ("persistent", "forgotten", "shared", "root")}
        layout = {
            "dtype": draw(st.sampled_from(["float32", "bfloat16"])),
            "vocab_size": draw(st.integers(1, 9)),
            "hidden_size": draw(st.integers(1, 5)),
            "tie_embeddings": draw(st.booleans()),
            "modules": {},
            "ties": [],
            "shared": [],
            "drop_keys": [],
        }
        counters = {"m": 0, "t": 0}

        def tensor():
            i = counters["t"]
            counters["t"] += 1
            if draw(st.sampled_from(["param", "buffer"])) == "param":
                shape = draw(st.lists(st.integers(1, MAX_DIM), min_size=1, max_size=3))
                return {"name": f"p{i}_weight", "kind": "param", "shape": shape}
            shape = draw(st.lists(st.integers(1, MAX_DIM), min_size=0, max_size=3))
            persistent = draw(st.sampled_from([False, True])) if allow["persistent"] else False
            forgotten = not persistent and allow["forgotten"] and draw(st.sampled_from([False, True]))
            return {
                "name": f"b{i}",
                "kind": "buffer",
                "shape": shape,
                "dtype": draw(st.sampled_from(BUFFER_DTYPES)),
                "persistent": persistent,
                "init": "forgotten" if forgotten else "recomputed",
            }

        def tensors(n_max):
            return [tensor() for _ in range(draw(st.integers(0, n_max)))]

        def grow(parent, depth):
            path = f"{parent}.m{counters['m']}"
            counters["m"] += 1
            layout["modules"][path] = tensors(3)
            if depth < 3:
                for _ in range(draw(st.integers(0, 2 if depth == 1 else 1))):
                    grow(path, depth + 1)

        if allow["root"]:
            for path in ("", "model"):
                own = tensors(2)
                if own:
                    layout["modules"][path] = own
        for _ in range(draw(st.integers(1, 3))):
            grow("model", 1)

        specs = tensor_specs(layout)
        order = module_order(layout)
        params = [n for n, s in specs.items() if s["kind"] == "param"]
        if params:
            for i in range(draw(st.integers(0, 2))):
                source = draw(st.sampled_from(params))
                where = draw(st.sampled_from([p for p in order if p in layout["modules"] or p == "model"]))
                layout["modules"].setdefault(where, [])
                layout["ties"].append({"source": source, "target": f"{where}.t{i}_weight" if where else f"t{i}_weight"})
        non_persistent = [n for n, s in specs.items() if s["kind"] == "buffer" and not s["persistent"]]
        if allow["shared"] and non_persistent:
            source = draw(st.sampled_from(non_persistent))
            later = [p for p in order[order.index(source.rpartition(".")[0]) + 1 :]]
            if later:
                where = draw(st.sampled_from(later))
                layout["modules"].setdefault(where, [])
                layout["shared"].append({"source": source, "alias": f"{where}.s0"})
        droppable = droppable_keys(layout)
        if droppable:
            layout["drop_keys"] = draw(st.lists(st.sampled_from(droppable), max_size=2, unique=True))
        # modules created only to hold a tie target or an alias keep an empty list: drop empty root entries
        for path in ("", "model"):
            if path in layout["modules"] and not layout["modules"][path] and not holds_extra(layout, path):
                del layout["modules"][path]
        validate(layout)
        return layout

    return draw_layout()

