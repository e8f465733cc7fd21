"""The options more than one command takes, declared once as `Annotated` aliases. A command uses the alias
(`threads: Threads = None`), so a flag reads and behaves the same wherever it appears."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

__all__ = ["TRUST_HELP", "VERIFY_HELP", "BACKEND_HELP", "JSON_HELP", "TrustModelCode", "Verify", "JsonOut",
           "Threads", "Device", "Backend", "Limit"]

TRUST_HELP = ("Import whatever model code (file.py:factory, module:factory) a checkpoint names: only for "
              "checkpoints you trust, since that code runs. builtin: and torchvision: models, ONNX files and "
              "engines need no consent.")

VERIFY_HELP = ("Check an ONNX file or engine against the sha256 its export manifest (NAME.manifest.json beside "
               "it) records, and refuse it when they differ; --no-verify runs it anyway.")

BACKEND_HELP = ("auto (by suffix: .onnx onnxruntime, .engine/.plan tensorrt, .safetensors torch), onnxruntime, "
                "torch or tensorrt.")

JSON_HELP = ("Write the result as JSON to PATH (atomically, beside the usual output), or give - to print only "
             "the JSON on stdout. A bare --json, last or before another option, means -.")

TrustModelCode = Annotated[bool, typer.Option("--trust-model-code", help=TRUST_HELP)]
Verify = Annotated[bool, typer.Option(help=VERIFY_HELP)]
JsonOut = Annotated[Path | None, typer.Option("--json", metavar="PATH|-", help=JSON_HELP)]
Threads = Annotated[int | None, typer.Option(help="CPU threads per model (onnxruntime intra-op, torch).")]
Device = Annotated[str | None, typer.Option(help="cpu, cuda or cuda:N (default: cpu; cuda for engines).")]
Backend = Annotated[str, typer.Option(help=BACKEND_HELP)]
Limit = Annotated[int | None, typer.Option(help="Use at most N images.")]
