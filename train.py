"""Entry point: ``python train.py {fit,validate,test,predict} --config configs/<x>.yaml [--section.option value]``."""

from __future__ import annotations

import operator

from lightning.pytorch.cli import LightningCLI

from callbacks.export import DreamBoothExport
from datamodules import DreamBoothDataModule
from lightning_modules.dreambooth import DreamBoothModule


class DreamBoothCLI(LightningCLI):
    """LightningCLI with the values that model and data share linked, so each is typed once."""

    def add_arguments_to_parser(self, parser) -> None:
        for name in ("pretrained_model_name_or_path", "revision", "variant"):
            parser.link_arguments(f"model.{name}", f"data.{name}")
        # A frozen text encoder's embeddings are cached by the data module; a trained one encodes every step.
        parser.link_arguments("model.train_text_encoder", "data.cache_text_embeddings", compute_fn=operator.not_)
        parser.add_lightning_class_args(DreamBoothExport, "export")


def cli_main(args: list[str] | None = None) -> DreamBoothCLI:
    return DreamBoothCLI(
        DreamBoothModule,
        DreamBoothDataModule,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    cli_main()
