"""`causvid`: generate, stream, eval, parity, bench, info."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence


def _latent_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"latent size must look like 32x32, got {text!r}") from None
    return h, w


def _pixel_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 832x480 (width x height), got {text!r}") from None
    if w <= 0 or h <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return w, h


def _print_json(result: dict, compact: bool) -> None:
    print(json.dumps(result) if compact else json.dumps(result, indent=2), flush=True)


def cmd_parity(args: argparse.Namespace) -> int:
    from .parity import run_parity

    try:
        ok = run_parity(args.file, only=args.only)
    except (FileNotFoundError, json.JSONDecodeError, KeyError) as exc:
        print(f"causvid parity: cannot read {args.file}: {exc}", file=sys.stderr)
        return 2
    return 0 if ok else 1


def cmd_bench(args: argparse.Namespace) -> int:
    args.seconds_given = args.seconds is not None
    if args.seconds is None:
        args.seconds = 600.0
    size_given, args.size = args.size is not None, args.size or (832, 480)
    if args.what == "model":
        from .bench import bench_model

        result = bench_model(args.preset or "wan2.1-t2v-1.3b", latent_hw=args.latent, frames=args.frames or 21,
                             chunk=args.chunk, repeats=args.repeats)
    elif args.what == "memory":
        from .memory import bench_memory

        if args.device != "cuda":
            print(f"causvid bench memory: --device {args.device}: only cuda is modelled", file=sys.stderr)
            return 2
        if args.window is None and args.seconds_given:
            print("causvid bench memory: --seconds makes an endless stream: give --window (and --sinks)",
                  file=sys.stderr)
            return 2
        try:
            result = bench_memory(args.preset or "wan2.1-t2v-1.3b", size=args.size,
                                  frames=None if args.seconds_given else (args.frames or 81),
                                  seconds=args.seconds if args.seconds_given else None,
                                  window=args.window, sinks=args.sinks, chunk_frames=args.chunk)
        except ValueError as exc:
            print(f"causvid bench memory: {exc}", file=sys.stderr)
            return 2
    elif args.what == "vae":
        from .vae_bench import bench_vae

        result = bench_vae(args.preset or "shapes")
    elif args.what == "stream":
        from .bench import bench_stream

        if args.device == "cuda":
            from .bench import bench_stream_cuda

            return bench_stream_cuda(args)
        result = bench_stream(seconds=args.seconds, model_path=args.model)
    elif args.what == "live":
        from .live.bench import bench_live

        if size_given and args.size[0] != args.size[1]:
            print("causvid bench live: --size must be square (WxW)", file=sys.stderr)
            return 2
        result = bench_live(seconds=args.seconds, model_path=args.model, size=args.size[0] if size_given else 64)
    else:  # argparse restricts the choices
        raise AssertionError(args.what)
    _print_json(result, args.json)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .checkpoints import CheckpointError, load_dit

    try:
        model = load_dit(args.path)
    except CheckpointError as exc:
        print(f"causvid info: {exc}", file=sys.stderr)
        return 2
    n = sum(p.numel() for p in model.parameters())
    _print_json({"kind": "dit", "layout": model.checkpoint_layout, "params": n,
                 "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
                 "config": model.config.to_dict()}, args.json)
    return 0


def _steps(text: str) -> dict:
    """A step preset name or a comma list of timesteps -> StreamSettings fields."""
    from .flow import STEP_PRESETS, step_preset

    if text in STEP_PRESETS:
        shift, steps = step_preset(text)
        return {"steps": steps, "shift": shift}
    try:
        steps = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--steps takes a preset ({', '.join(STEP_PRESETS)}) or a list "
                                         f"like 1000,750,500, got {text!r}") from None
    from .validate import InputError, check_steps

    try:
        return {"steps": check_steps(steps)}
    except InputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_float(name: str, high: Optional[float] = None):
    """An argparse type: a finite number > 0 (and <= high)."""
    def parse(text: str) -> float:
        from .validate import InputError, finite_number

        try:
            return finite_number(name, text, low=0.0, low_open=True, high=high)
        except InputError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return parse


def _settings(args: argparse.Namespace) -> dict:
    from .stream_presets import stream_preset

    out = stream_preset(args.stream_preset) if getattr(args, "stream_preset", None) else {}
    out.update(args.steps or {})
    if args.shift is not None:
        out["shift"] = args.shift
    if args.window is not None:
        out["window_frames"] = args.window
        out["sink_frames"] = args.sinks
    if args.switch_mode is not None:
        out["switch_mode"] = args.switch_mode
    return out


def _prompts(args: argparse.Namespace):
    from .schedule import PromptEvent, parse_schedule
    from .validate import read_text

    if args.schedule:
        return parse_schedule(read_text(args.schedule, "--schedule"))
    if args.prompt is None:
        raise ValueError("give --prompt TEXT, --schedule FILE or --prompts FILE")
    return [PromptEvent(0, args.prompt)]


def _read_inputs(args: argparse.Namespace) -> tuple:
    """(image, video, clip to extend), each read once however many prompts share it."""
    from .video_io import read_image, read_video

    return (_read_input(read_image, args.image, "--image") if args.image else None,
            _read_input(read_video, args.video, "--video") if args.video else None,
            _read_input(read_video, args.extend, "--extend") if getattr(args, "extend", None) else None)


def _request(args: argparse.Namespace, prompts, inputs: Optional[tuple] = None) -> "GenerationRequest":
    from .generate import GenerationRequest

    image, video, extend = inputs if inputs is not None else _read_inputs(args)
    height, width = args.height, args.width
    if video is not None and height is None and width is None:
        height, width = video.shape[1:3]  # video-to-video keeps the input's size by default
    if image is not None and height is None and width is None:
        height, width = image.shape[:2]
    if extend is not None and height is None and width is None:
        height, width = extend.shape[1:3]
    frames = args.frames if args.frames is not None else (len(video) if video is not None else 33)
    return GenerationRequest(prompts=prompts, frames=frames, height=64 if height is None else height,
                             width=64 if width is None else width,
                             seed=args.seed, settings=_settings(args), image=image, video=video,
                             strength=args.strength, extend=extend)


def _read_input(reader, path: str, what: str):
    """An input image or video, or an InputError that names it (missing, not a picture, truncated, empty)."""
    from .validate import InputError

    if Path(path).is_dir():
        raise InputError(f"{what} {path} is a folder: give a file")
    if not Path(path).is_file():
        raise InputError(f"{what} {path}: no such file")
    try:
        return reader(path)
    except MemoryError:
        raise
    except Exception as exc:  # PIL and PyAV raise their own types for every kind of damage
        raise InputError(f"{what} {path}: not a readable {'image' if what == '--image' else 'video'} "
                         f"({type(exc).__name__}: {str(exc)[:120]})") from None


def _check_request(comps, req, args) -> None:
    """What the request asks for, checked before any work: prompts inside the video, memory."""
    from .generate import latent_frames, make_stream
    from .schedule import ScheduleError
    from .validate import check_memory

    latent_frames(req.frames)  # a bad count is an error before any file is opened
    for ev in req.prompts:
        if ev.frame >= req.frames:
            raise ScheduleError(f"schedule: frame {ev.frame} ({ev.prompt!r}) is past the end of the video "
                                f"({req.frames} frames): remove the line or raise --frames")
    stream = make_stream(comps, req)  # sizes and settings checked; nothing allocated yet
    check_memory(stream.memory_needed(), f"a {req.width}x{req.height} video of {req.frames} frames",
                 args.allow_large, stream.device)
    _warn_unknown_words(comps, [ev.prompt for ev in req.prompts])


def _warn_unknown_words(comps, prompts) -> None:
    """The built-in text encoder knows a fixed vocabulary: say which words of a prompt it drops."""
    unknown = getattr(comps.text_encoder, "unknown_words", None)
    if unknown is None:
        return
    for prompt in prompts:
        dropped = unknown(prompt)
        if not prompt.strip():
            print("causvid: warning: an empty prompt: the model gets no text to follow", file=sys.stderr)
        elif dropped:
            print(f"causvid: warning: the built-in text encoder does not know {', '.join(map(repr, dropped))} "
                  f"in {prompt!r}: those words are dropped", file=sys.stderr)


def cmd_generate(args: argparse.Namespace) -> int:
    import time

    from tqdm import tqdm

    from .checkpoints import CheckpointError
    from .generate import generate_chunks
    from .schedule import PromptEvent, ScheduleError
    from .video_io import FPS, Mp4Writer, to_uint8

    from .validate import InputError, check_output, check_output_dir, read_text

    try:
        if args.prompts:
            if not args.out_dir:
                raise InputError("--prompts needs --out-dir")
            check_output_dir(args.out_dir)
            lines = [l.strip() for l in read_text(args.prompts, "--prompts").splitlines() if l.strip()]
            if not lines:
                raise InputError(f"--prompts {args.prompts} holds no prompts: write one prompt a line")
            jobs = [([PromptEvent(0, p)], Path(args.out_dir) / f"{i:03d}.mp4") for i, p in enumerate(lines)]
            for _, out in jobs:
                check_output(out, "--out-dir file")
        else:
            if not args.out:
                raise InputError("give --out FILE.mp4")
            jobs = [(_prompts(args), check_output(args.out))]
        comps = _components(args)
        inputs = _read_inputs(args)
        requests = [(_request(args, prompts, inputs), out) for prompts, out in jobs]
        for req, _ in requests:
            _check_request(comps, req, args)
        for req, out in requests:
            t0 = time.perf_counter()
            with Mp4Writer(out) as writer, tqdm(total=req.frames, unit="frame", desc=out.name,
                                                disable=args.quiet) as bar:
                for chunk in generate_chunks(comps, req, notice=lambda m: print(m, file=sys.stderr)):
                    frames = to_uint8(chunk.frames)
                    writer.write(frames)
                    bar.update(len(frames))
            took = time.perf_counter() - t0  # text encoding to the last frame written
            print(f"wrote {out} ({writer.frames} frames, {req.width}x{req.height}, {FPS} fps) in {took:.2f} s: "
                  f"{writer.frames / FPS / took:.1f}x real time")
    except (CheckpointError, ScheduleError, ValueError, FileNotFoundError) as exc:
        print(f"causvid generate: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_stream(args: argparse.Namespace) -> int:
    import time

    from .checkpoints import CheckpointError
    from .generate import latent_size
    from .schedule import ScheduleError, snap_schedule
    from .stream import CausalStream, StreamSettings
    from .validate import check_memory, check_output_dir
    from .video_io import to_uint8, write_mp4

    try:
        check_output_dir(args.out_dir)
        comps = _components(args)
        prompts = _prompts(args)
        fields = {**comps.stream_defaults, **_settings(args), "seed": args.seed}
        if not fields.get("window_frames") and not fields.get("kv_recompute_frames"):
            # an endless stream needs a rolling window (LongLive's 12 + 3 sinks) or Krea's recomputation
            fields["window_frames"] = 12
            fields.setdefault("sink_frames", 3)
        settings = StreamSettings.from_fields(fields)
        height, width = (64 if args.height is None else args.height), (64 if args.width is None else args.width)
        stream = CausalStream(comps.model, settings, latent_hw=latent_size(comps, height, width),
                              vae=comps.vae, text_encoder=comps.text_encoder,
                              device=next(comps.model.parameters()).device)
        check_memory(stream.memory_needed(), f"a {width}x{height} stream", args.allow_large, stream.device)
        layout_len = 1 + max(p.frame for p in prompts) // 4 + settings.chunk_frames
        layout = [settings.chunk_size(i) for i in range(layout_len)]
        by_chunk, notices = snap_schedule(prompts, layout)
        for n in notices:
            print(n, file=sys.stderr)
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        stream.set_prompt(by_chunk[0])
        made, t0 = 0, time.perf_counter()
        try:
            while args.seconds is None or made < args.seconds * 16:
                if stream.chunk_index in by_chunk and stream.chunk_index > 0:
                    stream.set_prompt(by_chunk[stream.chunk_index])
                chunk = stream.step()
                frames = to_uint8(chunk.frames)
                write_mp4(out / f"chunk_{chunk.index:05d}.mp4", frames)
                made += len(frames)
                print(f"chunk {chunk.index}: {len(frames)} frames in {chunk.seconds * 1000:.0f} ms "
                      f"({len(frames) / chunk.seconds:.1f} fps), {made / 16:.1f} s of video, "
                      f"wall {time.perf_counter() - t0:.1f} s", flush=True)
        except KeyboardInterrupt:
            print("stopped", file=sys.stderr)
    except (CheckpointError, ScheduleError, ValueError, FileNotFoundError) as exc:
        print(f"causvid stream: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_live(args: argparse.Namespace) -> int:
    from .checkpoints import CheckpointError
    from .generate import latent_size
    from .live.server import LiveServer, serve
    from .live.session import LEAD_S
    from .live.sources import VideoFileSource
    from .stream import CausalStream, StreamSettings
    from .validate import check_memory

    try:
        comps = _components(args)
        hw = latent_size(comps, 64 if args.height is None else args.height, 64 if args.width is None else args.width)
        fields = {**comps.stream_defaults, **_settings(args), "max_frames": None}
        if not fields.get("window_frames") and not fields.get("kv_recompute_frames"):  # endless: LongLive's window
            fields["window_frames"] = 12
            fields.setdefault("sink_frames", 3)
        device = next(comps.model.parameters()).device

        def make_stream(seed: int) -> CausalStream:
            return CausalStream(comps.model, StreamSettings.from_fields({**fields, "seed": seed}), latent_hw=hw,
                                vae=comps.vae, text_encoder=comps.text_encoder, device=device)

        first = make_stream(0)  # settings errors now, not at the first click
        check_memory(first.memory_needed(), f"a {hw[1] * 8}x{hw[0] * 8} live stream", args.allow_large, first.device)
        if not 0 < args.strength <= 1:
            raise ValueError(f"--strength must be in (0, 1], got {args.strength}")
        size = (hw[0] * comps.vae.config.space_factor, hw[1] * comps.vae.config.space_factor)
        if args.video is not None:
            VideoFileSource(args.video, *size)  # a missing or unreadable file now, not at the first click
        server = LiveServer(make_stream, args.out_dir, size=size, mode=args.switch_mode or "recache",
                            max_seconds=args.seconds, video=args.video, strength=args.strength,
                            lead_s=None if args.no_pace else LEAD_S)
    except (CheckpointError, ValueError, FileNotFoundError) as exc:
        print(f"causvid live: {exc}", file=sys.stderr)
        return 2
    serve(server, host=args.host, port=args.port)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .checkpoints import CheckpointError
    from .eval_run import evaluate_model
    from .pipeline import load_components

    try:
        comps = None if args.ground_truth else load_components(args.model, args.vae, args.text_encoder)
    except CheckpointError as exc:
        print(f"causvid eval: {exc}", file=sys.stderr)
        return 2
    result = evaluate_model(comps, n_in=args.n, n_held=args.held_out, frames=args.frames, streams=args.streams,
                            stream_chunks=args.stream_chunks, ground_truth=args.ground_truth, out=args.out)
    s = result["summary"]
    line = {g: {"n": s[g]["n"], "all_four": s[g]["accuracy"].get("all_four")} for g in ("in_distribution", "held_out")}
    print(json.dumps({"eval": line, "speed": result["speed"], "report": str(args.out)}))
    return 0


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", help="the text prompt")
    p.add_argument("--schedule", help="a prompt schedule file: lines 'FRAME: prompt'")
    p.add_argument("--switch-mode", choices=("cut", "recache", "blend"), help="how prompts change (default cut)")
    p.add_argument("--model", help="DiT checkpoint (default: the built-in model)")
    p.add_argument("--allow-large", action="store_true",
                   help="run even when the memory estimate says it will not fit this machine")
    p.add_argument("--lora", help="a LoRA for the DiT (LongLive's lora.pt, a ComfyUI LoRA), applied as it loads")
    p.add_argument("--lora-strength", type=float, default=1.0, help="the LoRA's weight (default 1)")
    from .stream_presets import STREAM_PRESETS

    p.add_argument("--stream-preset", choices=list(STREAM_PRESETS),
                   help="the model's stream settings (chunk size, steps, window, ...) when its file does not say "
                        "them and its name does not give them away")
    p.add_argument("--vae", help="VAE checkpoint (default: the built-in VAE)")
    p.add_argument("--text-encoder", help="text encoder (default: the built-in one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=_steps, help="step preset (causvid-3step, causvid-4step, self-forcing-4step) "
                                                 "or a list like 1000,750,500,250")
    p.add_argument("--shift", type=_positive_float("--shift"), help="flow shift for a custom step list")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--window", type=int, help="rolling KV window in latent frames (endless streams)")
    p.add_argument("--sinks", type=int, default=0, help="sink frames kept at the start of the window")
    p.add_argument("--device", default="auto",
                   help="auto (cuda, else mps, else cpu), or a torch device such as cuda:1; the text encoder stays "
                        "on the CPU (umT5-XXL would take 6-11 GB of a GPU for one prompt)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="DiT and VAE weights: auto = float32 on the CPU, bfloat16 on a GPU")


def _components(args: argparse.Namespace):
    """The model parts on the device and dtype the options ask for."""
    import torch

    from .pipeline import load_components

    if args.device == "auto":
        device = ("cuda" if torch.cuda.is_available()
                  else "mps" if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available() else "cpu")
    else:
        device = args.device
    try:
        device = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"--device {args.device}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA device here; use --device cpu")
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    if dtype is None and device.type != "cpu":
        dtype = torch.bfloat16
    return load_components(args.model, args.vae, args.text_encoder, device=device, dtype=dtype, text_device="cpu",
                           lora=args.lora, lora_strength=args.lora_strength)


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (what is wrong, and where to read more), exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="causvid", description="Streaming causal video generation (CausVid on Wan2.1).")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="make a video (MP4, 16 fps)")
    _add_generation_args(g)
    g.add_argument("--out", help="output FILE.mp4")
    g.add_argument("--frames", type=int, help="pixel frames, 4k+1 (default 33, or the input video's)")
    g.add_argument("--image", help="image-to-video: start from this PNG/JPEG")
    g.add_argument("--video", help="video-to-video: restyle this video")
    g.add_argument("--extend", help="video extension: continue this clip (4k+1 frames) up to --frames")
    g.add_argument("--strength", type=_positive_float("--strength", 1.0), default=0.7,
                   help="video-to-video: 1 ignores the input, lower keeps more")
    g.add_argument("--prompts", help="batch mode: a file with one prompt a line (needs --out-dir)")
    g.add_argument("--out-dir", help="batch mode: writes 000.mp4, 001.mp4, ... in order")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.set_defaults(func=cmd_generate)

    st = sub.add_parser("stream", help="stream without end: one MP4 segment per chunk, per-chunk latency printed")
    _add_generation_args(st)
    st.add_argument("--out-dir", required=True, help="folder for chunk_00000.mp4, chunk_00001.mp4, ...")
    st.add_argument("--seconds", type=float, help="stop after this many seconds of video (default: until Ctrl-C)")
    st.set_defaults(func=cmd_stream)

    ev = sub.add_parser("eval", help="generate Shapes World clips and judge them from pixels (JSON, markdown, PNG)")
    ev.add_argument("--out", required=True, help="report folder")
    ev.add_argument("--model")
    ev.add_argument("--vae")
    ev.add_argument("--text-encoder")
    ev.add_argument("--n", type=int, default=24, help="in-distribution clips")
    ev.add_argument("--held-out", type=int, default=12, help="held-out colour-shape clips")
    ev.add_argument("--frames", type=int, default=33)
    ev.add_argument("--streams", type=int, default=2, help="long streams for the drift curve")
    ev.add_argument("--stream-chunks", type=int, default=40)
    ev.add_argument("--ground-truth", action="store_true", help="score the renderer itself (sanity check)")
    ev.set_defaults(func=cmd_eval)

    q = sub.add_parser("parity", help="reproduce the reference implementations' outputs stored in a parity file")
    q.add_argument("file", help="NAME.json (NAME.safetensors must lie beside it)")
    q.add_argument("--only", choices=("dit", "vae"), help="run only the DiT or only the VAE cases")
    q.set_defaults(func=cmd_parity)

    b = sub.add_parser("bench", help="benchmarks printing one JSON line")
    b.add_argument("what", choices=("model", "vae", "stream", "memory", "live"))
    b.add_argument("--preset", help="model preset (default: wan2.1-t2v-1.3b for model and memory, shapes for vae)")
    b.add_argument("--latent", type=_latent_size, default=(32, 32), help="latent HxW (model bench)")
    b.add_argument("--frames", type=int, default=None,
                   help="stream length: latent frames for model (default 21), pixel frames 4k+1 for memory (81)")
    b.add_argument("--size", type=_pixel_size, default=None,
                   help="WxH in pixels (memory and stream --device cuda: default 832x480; live: 64x64)")
    b.add_argument("--window", type=int, default=None, help="rolling KV window in latent frames (memory)")
    b.add_argument("--sinks", type=int, default=0, help="sink frames of the window (memory)")
    b.add_argument("--device", default="cpu",
                   help="memory: cuda (modelled with fake tensors); stream: cuda runs on a real GPU")
    b.add_argument("--compile", action="store_true", help="stream --device cuda: torch.compile the DiT blocks")
    b.add_argument("--chunk", type=int, default=3, help="frames per chunk (model bench)")
    b.add_argument("--repeats", type=int, default=2, help="timed repeats, best kept (model bench)")
    b.add_argument("--seconds", type=float, default=None,
                   help="seconds of video (stream bench, default 600; memory: an endless stream this long)")
    b.add_argument("--model", help="DiT checkpoint (stream bench; default: the built-in model)")
    b.add_argument("--vae", help="stream --device cuda: the Wan VAE file (default: random weights, the same cost)")
    b.add_argument("--json", action="store_true", help="one compact JSON line")
    b.set_defaults(func=cmd_bench)

    lv = sub.add_parser("live", help="a local page that plays a stream while it is made and steers its prompt")
    _add_generation_args(lv)
    lv.add_argument("--port", type=int, default=8765)
    lv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    lv.add_argument("--out-dir", default="live", help="each session is recorded in a folder here")
    lv.add_argument("--seconds", type=float, help="end every session after this many seconds (default: on Stop)")
    lv.add_argument("--video", help="a video file the page can restyle (its 'video file' input)")
    lv.add_argument("--strength", type=_positive_float("--strength", 1.0), default=0.6,
                    help="video-to-video: how far the input is noised, 1 ignores it (default 0.6)")
    lv.add_argument("--no-pace", action="store_true",
                    help="make chunks as fast as possible instead of at most 1.5 s ahead of the player")
    lv.set_defaults(func=cmd_live)

    i = sub.add_parser("info", help="recognise a checkpoint and print its layout and config")
    i.add_argument("path")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_info)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Exit 2 on a usage error (a bad option, file or setting), 1 on a runtime failure, 130 on Ctrl-C; one line
    on stderr saying what to do, and a traceback only with --debug."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted before or after the command
    args = build_parser().parse_args([a for a in argv if a != "--debug"])
    args.debug = debug
    name = f"causvid {args.command}"
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"{name}: interrupted (no partial output was kept)", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        from .checkpoints import CheckpointError
        from .schedule import ScheduleError
        from .validate import InputError

        usage = isinstance(exc, (InputError, CheckpointError, ScheduleError, FileNotFoundError, ValueError))
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if not usage and not isinstance(exc, (RuntimeError, OSError)):
            detail = f"unexpected {type(exc).__name__}: {detail} (run with --debug for the traceback)"
        print(f"{name}: {detail}", file=sys.stderr)
        return 2 if usage else 1


if __name__ == "__main__":
    sys.exit(main())
