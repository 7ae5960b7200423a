"""The layers a pruner prunes: :func:`prunable_layers`, to see before pruning what will be."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from lightning_fls._validation import check_patterns
from lightning_fls.layers.adapters import LayerAdapter
from lightning_fls.layers.attention import in_blocks, transformer_blocks
from lightning_fls.layers.registry import find_layers
from lightning_fls.masks import match_names


def prunable_layers(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    *,
    trainable_only: bool = False,
) -> dict[str, LayerAdapter]:
    """Adapters of the layers to prune, keyed by weight name; clear errors if there are none.

    Without ``include``, every registered layer (Linear, Conv2d, ``nn.MultiheadAttention``'s
    packed in-projection, types added with :func:`~lightning_fls.register_layer`) is pruned,
    except in a transformer: when the model has attention modules (``nn.MultiheadAttention``,
    or a class whose name ends in ``Attention``), only the layers inside the transformer blocks
    (the attention modules' parents: attention and MLP projections) are, so embeddings and the
    output head stay dense. ``include`` selects among all registered layers by glob, and also
    reaches a norm, an embedding or any other module with parameters when an entry is exactly
    its weight's name (``"norm.weight"``), seen through the generic adapter.

    Args:
        model: The model.
        include: Glob patterns of weight names to prune (None: the default set above).
        exclude: Glob patterns of weight names not to prune.
        trainable_only: Leave out weights frozen with ``requires_grad=False`` (for training:
            an optimizer never moves them). A frozen weight that ``include`` names is an error.

    Returns:
        Each layer's adapter (its module, canonical shape, parameters) by weight name, in
        ``named_modules`` order: ``list(prunable_layers(model))`` are the weights that
        :func:`~lightning_fls.prune_one_shot` or the callback would prune with the same
        ``include``/``exclude``.

    Raises:
        ValueError: If there is no prunable layer, a pattern matches nothing, only frozen
            weights are left, two selected layers share one weight tensor (tied weights), or
            a selected layer cannot be recorded (attention with ``add_bias_kv``).
    """
    include = check_patterns("include", include)
    exclude = check_patterns("exclude", exclude)
    layers = find_layers(model)
    if include is not None:  # norms, embeddings …: only when named exactly
        named = set(include)
        layers = {
            key: layers.get(key, adapter)
            for key, adapter in find_layers(model, fallback=True).items()
            if key in layers or key in named
        }
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no prunable layer (Linear, Conv2d, MultiheadAttention "
            "or a type registered with lightning_fls.register_layer)."
        )
    if include is None:
        blocks = transformer_blocks(model)
        candidates = [key for key in layers if not blocks or in_blocks(key, blocks)]
        # Exclude patterns may name layers outside the default set (a transformer's head).
        allowed = set(match_names(list(layers), None, exclude))
        kept = [key for key in candidates or layers if key in allowed]
    else:
        kept = match_names(list(layers), include, exclude)
    if trainable_only:
        frozen = [key for key in kept if not _weight_parameter(layers[key]).requires_grad]
        if frozen and include is not None:
            raise ValueError(
                f"`include` selects weights frozen with requires_grad=False: {frozen}. An "
                "optimizer never moves them; unfreeze them or leave them out of `include`."
            )
        if frozen and len(frozen) == len(kept):
            raise ValueError(
                f"Every prunable weight of {type(model).__name__} is frozen "
                f"(requires_grad=False): {frozen}. Unfreeze the layers to prune."
            )
        kept = [key for key in kept if key not in frozen]
    if not kept:
        raise ValueError("`include`/`exclude` leave no layer to prune.")
    owners: dict[int, str] = {}
    for key in kept:
        other = owners.setdefault(id(_weight_parameter(layers[key])), key)
        if other != key:
            raise ValueError(
                f"`{other}` and `{key}` are one tensor (tied weights): lightning_fls prunes "
                f"each weight as one layer. Leave both out with exclude=[{other!r}, {key!r}]."
            )
        try:
            layers[key].check_supported()
        except ValueError as error:
            raise ValueError(f"`{key}`: {error}") from None
    return {key: layers[key] for key in kept}


def _weight_parameter(adapter: LayerAdapter) -> Tensor:
    weight: Tensor = getattr(adapter.module, adapter.key_parameter)
    return weight
