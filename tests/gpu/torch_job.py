"""A deterministic torch training job with a large GPU state, for tests/gpu/run_on_gpu.sh.

State on the GPU: a `--gib` GiB float32 "memory" table the job reads and rewrites every step, plus an MLP
and its Adam moments. Each step trains on a slice of the table, then writes the model's output back into
that slice, so the trajectory depends on every byte of GPU state surviving a checkpoint.

Output (appended to --log, one open/write/close per line: at a CRIU dump the log is not open, so CRIU
does not pin its size and the restored job can keep appending):
    start pid=<pid> device=<name> state_bytes=<n>
    step=<n> loss=<float.hex()>            exact, bit for bit
    done steps=<N> checksum=<sha256 of every parameter, Adam moment and the table>
stdout/stderr may be /dev/null; a crash is written to the log as `error ...`.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
import traceback


def log_line(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def run(args: argparse.Namespace) -> None:
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    import torch

    torch.use_deterministic_algorithms(True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(args.seed)
    dev = torch.device("cuda")
    width = 1024
    rows = int(args.gib * (1 << 30)) // (width * 4)
    gen = torch.Generator(device=dev).manual_seed(args.seed)
    table = torch.randn(rows, width, device=dev, generator=gen)
    model = torch.nn.Sequential(
        torch.nn.Linear(width, 4096),
        torch.nn.GELU(),
        torch.nn.Linear(4096, 4096),
        torch.nn.GELU(),
        torch.nn.Linear(4096, width),
    ).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    batch = args.batch
    state_bytes = table.numel() * 4 + sum(p.numel() * 4 * 3 for p in model.parameters())
    log_line(args.log, f"start pid={os.getpid()} device={torch.cuda.get_device_name(dev)} state_bytes={state_bytes}")
    for step in range(args.steps):
        start = (step * batch) % (rows - batch)
        x = table[start : start + batch]
        target = torch.sin(x).roll(1, dims=1)
        out = model(x)
        loss = torch.nn.functional.mse_loss(out, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            table[start : start + batch] = 0.9 * x + 0.1 * out.detach()
        line = f"step={step} loss={loss.item().hex()}"  # .item() waits for the step's GPU work
        log_line(args.log, line)
        if args.step_sleep:
            time.sleep(args.step_sleep)
    digest = hashlib.sha256()
    tensors = [p.detach() for p in model.parameters()]
    for p in model.parameters():
        st = opt.state[p]
        tensors += [st["exp_avg"], st["exp_avg_sq"]]
    tensors.append(table)
    for t in tensors:
        flat = t.contiguous().view(-1)
        for i in range(0, flat.numel(), 1 << 26):  # 256 MiB at a time to the host
            digest.update(flat[i : i + (1 << 26)].cpu().numpy().tobytes())
    log_line(args.log, f"done steps={args.steps} checksum={digest.hexdigest()}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--log", required=True)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--gib", type=float, default=4.0, help="size of the GPU table (the bulk of GPU state)")
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--step-sleep", type=float, default=0.02, help="seconds between steps (room to checkpoint)")
    args = p.parse_args()
    try:
        run(args)
    except BaseException:
        log_line(args.log, "error " + traceback.format_exc().replace("\n", " | "))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
