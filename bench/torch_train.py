"""The PyTorch reference run: the same recipe as ``python -m tinyconv.train``, in PyTorch, on identical batches.

    python -m bench.torch_train --epochs 6          # takes every option of tinyconv.train

It parses the same command line as ``tinyconv.train`` and reads the data through tinyconv's readers and batch
iterator (same validation split, order, crops, flips and normalization), so the two runs differ only in the engine:
MobileNet v1 built like ``models.mobilenet_v1`` (He-uniform kernels, Glorot classifier, BN momentum and eps 1e-3 as
the run's model, ReLU, dropout), SGD with Nesterov momentum and weight decay on kernels only, the
learning rate set every step from ``tinyconv.optim.LRSchedule``, cross-entropy with label smoothing.

PyTorch's best CPU setup: 2 threads, channels_last tensors (tinyconv's NHWC batches are already in that memory
order), and glibc's allocator told to keep freed memory (``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_``);
without them every large activation is an mmap/munmap pair and page faults cost ~20%. The script re-executes
itself with those variables set unless they are already set (or ``TORCH_TRAIN_NO_REEXEC=1``).

One difference is deliberate: strided 3x3 convs pad 1 on every side (PyTorch's usual MobileNet) instead of
TensorFlow's 'same' (bottom/right only); output sizes and costs are equal, an extra F.pad per strided conv is not.

Prints images/s and validation and test accuracy per epoch and a final summary line. A benchmark: never run in
tests. Only this file in the repository imports torch.
"""
import math
import os
import sys
import time

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432",  # 32 MiB, glibc's maximum: activations stay on the heap
              "MALLOC_TRIM_THRESHOLD_": "1073741824"}  # never give freed memory back between steps


def _tune_allocator():
    """Re-execute with the allocator variables (glibc reads them at start-up only), or print the advice."""
    missing = {k: v for k, v in MALLOC_ENV.items() if k not in os.environ}
    if not missing:
        return
    advice = " ".join(f"{k}={v}" for k, v in MALLOC_ENV.items())
    if os.environ.get("TORCH_TRAIN_NO_REEXEC") == "1":
        print(f"advice: run with {advice} for PyTorch's best CPU speed", file=sys.stderr)
        return
    print(f"note: re-running with {advice} (glibc keeps freed activations; set TORCH_TRAIN_NO_REEXEC=1 to skip)",
          file=sys.stderr)
    os.execve(sys.executable, [sys.executable, "-m", "bench.torch_train", *sys.argv[1:]], {**os.environ, **missing})


def mobilenet_v1(torch, *, alpha, classes, in_channels, dropout, bn_momentum, shallow=False, full_conv=False,
                 seed=0):
    """MobileNet v1 as in ``models.mobilenet_v1`` (its table is reused), NCHW modules for channels_last input."""
    from models.mobilenet import MOBILENET_V1, SHALLOW_BLOCKS
    nn = torch.nn
    torch.manual_seed(seed)

    def conv_bn(cin, cout, kernel, stride, groups=1):
        conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False)
        nn.init.kaiming_uniform_(conv.weight, nonlinearity="relu")  # U(+-sqrt(6 / fan_in)), as tinyconv
        return [conv, nn.BatchNorm2d(cout, eps=1e-3, momentum=1 - bn_momentum), nn.ReLU(inplace=True)]

    layers, c, block = [], in_channels, 0
    for row in MOBILENET_V1:
        n = int(row.channels * alpha)
        if row.kind == "conv":
            layers += conv_bn(c, n, row.kernel, row.stride)
        else:
            block += 1
            if shallow and block in SHALLOW_BLOCKS:
                continue
            if full_conv:
                layers += conv_bn(c, n, row.kernel, row.stride)
            else:
                layers += conv_bn(c, c, row.kernel, row.stride, groups=c) + conv_bn(c, n, 1, 1)
        c = n
    fc = nn.Linear(c, classes)
    nn.init.xavier_uniform_(fc.weight)
    nn.init.zeros_(fc.bias)
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), fc]
    return nn.Sequential(*layers)


def main(argv=None):
    _tune_allocator()
    import torch
    from tinyconv import train as tc_train
    from tinyconv.data import Augment, Normalization, iterate_batches, num_batches
    from tinyconv.optim import LRSchedule

    args = tc_train.make_parser(
        prog="python -m bench.torch_train",
        description="tinyconv.train's recipe in PyTorch, on the same batches: the reference run.").parse_args(argv)
    if args.model != "mobilenet" or args.optimizer not in ("sgd", "adam"):
        sys.exit("bench.torch_train runs --model mobilenet with --optimizer sgd or adam")
    config, settings = tc_train.run_description(args)
    threads = args.threads or 2
    torch.set_num_threads(threads)
    data = tc_train.load_data(config["data"])
    train, val, test = data["train"], data["val"], data["test"]
    norm = Normalization.fit(train.images)
    augment = Augment(**settings["augment"]) if settings["augment"] else None
    m = config["model"]
    model = mobilenet_v1(torch, alpha=m["alpha"], classes=train.num_classes, in_channels=train.image_shape[2],
                         dropout=m["dropout"], bn_momentum=m["bn_momentum"], shallow=m["shallow"],
                         full_conv=m["full_conv"], seed=args.seed)
    model = model.to(memory_format=torch.channels_last)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if args.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, nesterov=args.nesterov)
    else:
        opt = torch.optim.AdamW(groups, lr=args.lr)
    steps = num_batches(len(train), args.batch_size, drop_last=True)
    sched = LRSchedule(args.schedule, lr=args.lr, total_steps=args.epochs * steps,
                       warmup_steps=min(round(args.warmup * steps), args.epochs * steps))
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)

    def batches(ds, **kw):
        for x, y in iterate_batches((ds.images, ds.labels), normalization=norm, **kw):
            yield torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(y)  # NHWC memory = channels_last

    def accuracy(ds):
        model.eval()
        correct = 0
        with torch.no_grad():
            for x, y in batches(ds, batch_size=500, shuffle=False):
                correct += int((model(x).argmax(1) == y).sum())
        return correct / len(ds)

    params = sum(p.numel() for p in model.parameters())
    print(f"PyTorch {torch.__version__}, {threads} threads, channels_last; MobileNet v1 alpha {m['alpha']} "
          f"res {args.res}: {params:,} parameters; {len(train):,} training images, batch {args.batch_size}, "
          f"{args.epochs} epochs")
    train_seconds, seen_total = 0.0, 0
    for epoch in range(args.epochs):
        model.train()
        start, seen, loss_sum = time.perf_counter(), 0, 0.0
        for b, (x, y) in enumerate(batches(train, batch_size=args.batch_size, seed=args.seed, epoch=epoch,
                                           drop_last=True, augment=augment)):
            for group in opt.param_groups:
                group["lr"] = sched(epoch * steps + b)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach()) * len(y)
            seen += len(y)
        seconds = time.perf_counter() - start
        train_seconds += seconds
        seen_total += seen
        if not math.isfinite(loss_sum):
            sys.exit(f"loss became NaN or Inf in epoch {epoch + 1}")
        val_acc = f"val {100 * accuracy(val):.2f}%, " if val is not None else ""
        print(f"epoch {epoch + 1}/{args.epochs}: train loss {loss_sum / seen:.4f}, {val_acc}test "
              f"{100 * accuracy(test):.2f}%, {seconds:.1f} s, {seen / seconds:,.0f} images/s "
              f"(training so far {train_seconds:.0f} s)", flush=True)
    print(f"torch: test accuracy {100 * accuracy(test):.2f}% | {params:,} parameters | training {train_seconds:.1f} s "
          f"({seen_total / train_seconds:,.0f} images/s) | {args.epochs} epochs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
