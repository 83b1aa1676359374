"""``onorm revert``: a converted model back to BatchNorm, for tools that only know BatchNorm."""

from __future__ import annotations

from typing import Any

import torch

from ..convert import ConversionWarning, revert
from ..errors import EXIT_OK
from ..files import check_output_path, write_atomically
from ..layers import OnlineNormBase
from ..load import PICKLED_MODULE
from .app import Console, app, run_command, warnings_shown_on
from .options import (
    ArchKwargsOpt,
    ArchOpt,
    DebugOpt,
    ForceOpt,
    JsonOpt,
    KeyOpt,
    ModelArg,
    OutputOpt,
    TrustOpt,
    load_for_cli,
)


@app.command("revert")
def revert_command(
    model: ModelArg,
    output: OutputOpt = None,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    key: KeyOpt = None,
    trust: TrustOpt = False,
    force: ForceOpt = False,
    json_mode: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Turn a converted model's OnlineNorm layers back into BatchNorm with the frozen statistics.

    Writes the BatchNorm model's state dict (the original code loads it with load_state_dict),
    or a pickled module for a pickled module. The clamp is not kept: BatchNorm has none.
    """

    def body(console: Console) -> tuple[int, dict[str, Any]]:
        loaded = load_for_cli(console, model, arch, arch_kwargs, key, trust)
        destination = check_output_path(output or model.with_name(f"{model.stem}_bn.pt"), [model], force)
        online = [name for name, m in loaded.module.named_modules() if isinstance(m, OnlineNormBase)]
        with warnings_shown_on(console, ConversionWarning):
            reverted = revert(loaded.module)
        content = reverted if loaded.format == PICKLED_MODULE else reverted.state_dict()
        write_atomically(destination, lambda tmp: torch.save(content, tmp), replace=force)
        written = "pickled_module" if loaded.format == PICKLED_MODULE else "state_dict"
        console.print(f"reverted {len(online)} OnlineNorm layers to BatchNorm -> {destination} ({written})")
        return EXIT_OK, {"input": str(model), "output": str(destination), "output_format": written, "reverted": online}

    run_command("revert", json_mode, debug, body)
