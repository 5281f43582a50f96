"""Helpers for the teacher tests: a local HTTP file server with Range support and fault injection,
registry entries derived from the real ones (small archs, local URLs), and checkpoint generators
that write each family's exact on-disk layout from randomly initialised reference models."""

from __future__ import annotations

import copy
import io
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import torch
import torchvision
import yaml
from torch import nn

from distillctl.teachers.registry import load_registry


class FileServer:
    """Serves ``files[path] = bytes`` on 127.0.0.1; honours ``Range``; ``drop_after[path] = n`` makes the
    first full request for ``path`` send a full Content-Length but close after ``n`` bytes."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.drop_after: dict[str, int] = {}
        self.support_range = True
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                range_header = self.headers.get("Range")
                server.requests.append((self.path, range_header))
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                start = 0
                if range_header and server.support_range:
                    start = int(range_header.split("=")[1].split("-")[0])
                    if start >= len(body):
                        self.send_response(416)
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                payload = body[start:]
                cut = server.drop_after.pop(self.path, None) if start == 0 else None
                if cut is not None:
                    self.wfile.write(payload[:cut])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torch_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def derive_entry(base: str, **overrides: Any) -> dict[str, Any]:
    """A registry entry body copied from the real entry ``base`` with fields replaced."""
    body = load_registry().teachers[base].model_dump(exclude={"name"}, exclude_none=True)
    body["aliases"] = []  # the real entry keeps its aliases
    body.update(overrides)
    return body


def write_registry(path: Path, entries: dict[str, dict[str, Any]], monkeypatch: Any) -> None:
    path.write_text(yaml.safe_dump({"version": 1, "teachers": entries}, sort_keys=False))
    monkeypatch.setenv("DISTILLCTL_REGISTRY", str(path))


# --- reference models --------------------------------------------------------------------------

def randomise_bn(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial BN running stats, so a converter that loses them cannot pass."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
            if module.affine:
                module.weight.data.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
                module.bias.data.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)
    return model


def resnet18_with_head(head: nn.Module | None, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=10)
    model.fc = head if head is not None else nn.Identity()
    return randomise_bn(model, seed).eval()


def vit_tiny(name: str = "vit_small_patch16_224", seed: int = 0, **kwargs: Any) -> nn.Module:
    import timm

    torch.manual_seed(seed)
    args = dict(img_size=32, depth=2, embed_dim=48, num_heads=6, num_classes=0)
    args.update(kwargs)
    model = timm.create_model(name, pretrained=False, **args)
    with torch.no_grad():  # zero-initialised tokens would hide a lost cls_token / pos_embed
        for name, parameter in model.named_parameters():  # sharper attention: the head count matters
            if name.endswith("attn.qkv.weight"):
                parameter.mul_(4.0)
        for key in ("cls_token", "pos_embed", "reg_token"):
            if getattr(model, key, None) is not None:
                getattr(model, key).normal_(std=0.5)
        for module in model.modules():
            if hasattr(module, "gamma") and isinstance(module.gamma, torch.Tensor):
                module.gamma.normal_(std=0.5)
    return model.eval()


def mlp(dims: list[int], bias: bool = False, last_bn: bool = True) -> nn.Sequential:
    """MoCo v3 style: Linear(no bias)-BN-ReLU ... Linear(no bias)-BN(affine=False)."""
    layers: list[nn.Module] = []
    for index in range(len(dims) - 1):
        layers.append(nn.Linear(dims[index], dims[index + 1], bias=bias))
        if index < len(dims) - 2:
            layers += [nn.BatchNorm1d(dims[index + 1]), nn.ReLU()]
        elif last_bn:
            layers.append(nn.BatchNorm1d(dims[index + 1], affine=False))
    return nn.Sequential(*layers)


def prefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + key: value for key, value in state.items()}


def perturbed(module: nn.Module) -> nn.Module:
    """A momentum-encoder stand-in: same keys, different values (so picking it would be caught)."""
    other = copy.deepcopy(module)
    with torch.no_grad():
        for tensor in other.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(0.05)
    return other
