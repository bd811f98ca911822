"""What an attached method sees (`SteeringHost`), and the bridge for methods on the old interface (`LegacyState`).

`SteeringHost` implements the `Host` protocol on top of a `Steering` handle and hides the rest of it (a method
cannot remove the steering, nor reach other methods). Hooks registered through it are skipped while the
steering is paused and end up in the handle's list, so ``remove()`` takes them off in reverse order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lvlm_steer.method import Method, MethodState

if TYPE_CHECKING:
    import torch
    from torch import nn

    from lvlm_steer.adapters import Adapter
    from lvlm_steer.attention import AttentionCall
    from lvlm_steer.context import ForwardContext
    from lvlm_steer.model_info import ModelInfo
    from lvlm_steer.stats import LayerTokens
    from lvlm_steer.steering import Steering


class SteeringHost:
    """The `Host` of one steering: model facts, layout, pausing and hook registration, nothing else."""

    __slots__ = ("_steering",)

    def __init__(self, steering: Steering) -> None:
        self._steering = steering

    @property
    def info(self) -> ModelInfo:
        return self._steering.info

    @property
    def adapter(self) -> Adapter:
        return self._steering.adapter

    @property
    def model(self) -> nn.Module:
        return self._steering.model

    @property
    def processor(self) -> Any:
        return self._steering.processor

    @property
    def context(self) -> ForwardContext:
        return self._steering.context

    @property
    def paused(self) -> bool:
        return self._steering.paused

    @property
    def generating(self) -> bool:
        return self._steering.generating

    def pause(self, stream_state: dict[str, Any] | None = None) -> contextlib.AbstractContextManager[None]:
        return self._steering.pause(stream_state)

    def add_forward_pre_hook(self, module: nn.Module, hook: Callable[..., Any], *, with_kwargs: bool = False) -> None:
        steering = self._steering

        def unless_paused(mod: nn.Module, *args: Any) -> Any:
            return None if steering.paused else hook(mod, *args)

        self.own(module.register_forward_pre_hook(unless_paused, with_kwargs=with_kwargs))

    def own(self, handle: Any) -> None:
        self._steering._handles.append(handle)


class LegacyState(MethodState):
    """A method on the old interface: its state lives on the method object, which gets the whole handle."""

    def __init__(self, method: Method, steering: Steering) -> None:
        super().__init__(method, SteeringHost(steering))
        self.steering = steering
        steering._handles.extend(method.attach(steering))

    def reset(self) -> None:
        self.method.reset()

    def prepare(self, forward_kwargs: dict[str, Any]) -> None:
        self.method.prepare(self.steering, forward_kwargs)

    def edit_attention(self, call: AttentionCall) -> torch.Tensor:
        return self.method.edit_attention(call)

    def layer_tokens(self) -> LayerTokens | None:
        return self.method.layer_tokens(self.steering)
