"""Demo audio set: one synthesized sound event per 1 s clip (16 kHz mono) in colored background noise.

The class is the kind of sound (tone, chord, chirp direction, modulation, noise, clicks, pluck); pitch,
loudness, onset, duration and the background noise are nuisance factors.
"""

from __future__ import annotations

import io

import numpy as np
import soundfile as sf

CLASSES = [
    "pure tone",
    "harmonic tone",
    "chord",
    "rising chirp",
    "falling chirp",
    "tremolo tone",
    "vibrato tone",
    "noise burst",
    "click train",
    "plucked string",
]
SAMPLE_RATE, SECONDS = 16_000, 1.0
NOISE_COLORS = {"white": 0.0, "pink": 1.0, "brown": 2.0}  # power spectrum ~ 1 / f**exponent


def shaped_noise(rng: np.random.Generator, n: int, gain) -> np.ndarray:
    """Unit-RMS white noise of length ``n`` filtered by the amplitude response ``gain(frequency_hz)``."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    spectrum *= gain(np.fft.rfftfreq(n, 1 / SAMPLE_RATE).astype(np.float32))
    x = np.fft.irfft(spectrum, n)
    return x / np.sqrt(np.mean(x**2))


def colored_noise(rng: np.random.Generator, n: int, exponent: float) -> np.ndarray:
    """Unit-RMS noise of length ``n`` whose power spectrum falls as ``1 / f**exponent``."""
    return shaped_noise(rng, n, lambda f: np.maximum(f, 20.0) ** np.float32(-exponent / 2))


def bandpass_noise(rng: np.random.Generator, n: int, center: float, octaves: float) -> np.ndarray:
    """Unit-RMS white noise filtered by a Gaussian band ``octaves`` wide (std) around ``center`` Hz."""
    return shaped_noise(rng, n, lambda f: np.exp(-0.5 * (np.log2(np.maximum(f, 1.0) / center) / octaves) ** 2))


def harmonics(phase: np.ndarray, f0: float, rolloff: float, log_decay: np.ndarray | None = None) -> np.ndarray:
    """Sum of the first 12 harmonics of ``f0`` below 7 kHz, amplitude ``k**-rolloff``.

    With ``log_decay`` (log of the fundamental's envelope), harmonic k decays ``sqrt(k)`` times as fast, as in a string.
    """
    out = np.zeros_like(phase)
    for k in range(1, min(12, int(7000 // f0)) + 1):
        partial = np.sin(k * phase) * k**-rolloff
        out += partial if log_decay is None else partial * np.exp(log_decay * np.sqrt(k))
    return out


def sound_event(rng: np.random.Generator, kind: str, t: np.ndarray) -> tuple[np.ndarray, dict]:
    """The sound ``kind`` on time axis ``t`` (seconds from the event's onset), before its envelope; its parameters."""
    f0 = float(np.exp(rng.uniform(np.log(150), np.log(1500))))
    phase = 2 * np.pi * f0 * t + rng.uniform(0, 2 * np.pi)
    params = {"pitch_hz": round(f0, 1)}
    if kind == "pure tone":
        x = np.sin(phase)
    elif kind == "harmonic tone":
        x = harmonics(phase, f0, rng.uniform(0.5, 1.5))
    elif kind == "chord":
        third = 2 ** (int(rng.choice((3, 4))) / 12)  # minor or major triad
        x = sum(np.sin(r * phase) + 0.3 * np.sin(2 * r * phase) for r in (1.0, third, 2 ** (7 / 12)))
    elif kind in ("rising chirp", "falling chirp"):
        ratio = rng.uniform(2.0, 5.0)
        lo = min(f0, 6000 / ratio)
        rate = float(np.log(ratio) / t[-1])  # exponential sweep from lo to lo * ratio over the event
        sign = 1 if kind == "rising chirp" else -1
        start = lo if sign > 0 else lo * ratio
        x = np.sin(2 * np.pi * start * np.expm1(sign * rate * t) / (sign * rate))  # phase = 2 pi * integral of f
        params = {"pitch_hz": round(float(start), 1), "sweep_ratio": round(float(ratio), 2)}
    elif kind == "tremolo tone":
        rate, depth = rng.uniform(4, 12), rng.uniform(0.7, 1.0)
        x = np.sin(phase) * (1 - depth * (0.5 + 0.5 * np.cos(2 * np.pi * rate * t)))
        params["rate_hz"] = round(float(rate), 2)
    elif kind == "vibrato tone":
        rate, depth = rng.uniform(4, 8), rng.uniform(0.03, 0.08)
        # f(t) = f0 (1 + depth sin(2 pi rate t))  ->  phase = 2 pi f0 (t - depth cos(2 pi rate t) / (2 pi rate))
        x = np.sin(phase - f0 * depth * np.cos(2 * np.pi * rate * t) / rate)
        params["rate_hz"] = round(float(rate), 2)
    elif kind == "noise burst":
        center = float(np.exp(rng.uniform(np.log(300), np.log(5000))))
        x = bandpass_noise(rng, len(t), center, rng.uniform(0.2, 1.0))
        params = {"pitch_hz": round(center, 1)}
    elif kind == "click train":
        rate = rng.uniform(6, 25)
        clicks = np.zeros_like(t)
        clicks[(np.arange(0, t[-1], 1 / rate) * SAMPLE_RATE).astype(int)] = 1.0
        ring = np.exp(-np.arange(48) / rng.uniform(3, 12)) * rng.choice((-1, 1), 48)  # a short noisy impulse
        x = np.convolve(clicks, ring)[: len(t)]
        params = {"rate_hz": round(float(rate), 2)}
    elif kind == "plucked string":
        tau = rng.uniform(0.05, 0.25)
        x = harmonics(phase, f0, rng.uniform(0.5, 1.2), log_decay=-t / tau)
    else:
        raise ValueError(f"unknown sound {kind!r}; expected one of {CLASSES}")
    return x / (np.max(np.abs(x)) + 1e-9), params


def envelope(rng: np.random.Generator, n: int, sustained: bool) -> np.ndarray:
    """Attack-sustain-release gain over ``n`` samples (a plucked string only gets a tiny fade-in and -out)."""
    attack = int(SAMPLE_RATE * (rng.uniform(0.005, 0.04) if sustained else 0.002))
    release = int(SAMPLE_RATE * (rng.uniform(0.01, 0.08) if sustained else 0.01))
    env = np.ones(n)
    env[:attack] = np.linspace(0, 1, attack, endpoint=False)
    env[n - release :] = np.linspace(1, 0, release)
    return env


def render_clip(rng: np.random.Generator, label: int) -> tuple[np.ndarray, dict]:
    """A (SAMPLE_RATE * SECONDS,) float32 waveform of sound ``CLASSES[label]`` in background noise, and its metadata."""
    kind = CLASSES[label]
    total = int(SAMPLE_RATE * SECONDS)
    onset, duration = rng.uniform(0.0, 0.35), rng.uniform(0.35, 0.65)
    start, n = int(onset * SAMPLE_RATE), int(duration * SAMPLE_RATE)
    # float32 synthesis: several times faster sines, and far more precision than the 16-bit output keeps.
    event, params = sound_event(rng, kind, np.arange(n, dtype=np.float32) / np.float32(SAMPLE_RATE))
    event *= envelope(rng, n, sustained=kind != "plucked string")
    gain_db = rng.uniform(-26, -6)
    clip = np.zeros(total)
    clip[start : start + n] = event * 10 ** (gain_db / 20)
    noise_name = list(NOISE_COLORS)[rng.integers(len(NOISE_COLORS))]
    snr_db = rng.uniform(0, 25)
    event_rms = np.sqrt(np.mean(clip[start : start + n] ** 2))
    clip += colored_noise(rng, total, NOISE_COLORS[noise_name]) * event_rms * 10 ** (-snr_db / 20)
    clip /= max(1.0, np.max(np.abs(clip)) / 0.99)  # no clipping
    meta = {
        "sound": kind,
        "onset_s": round(onset, 3),
        "duration_s": round(duration, 3),
        "gain_db": round(gain_db, 1),
        "noise": noise_name,
        "snr_db": round(snr_db, 1),
        **params,
    }
    return clip.astype(np.float32), meta


def audio_caption(rng: np.random.Generator, meta: dict) -> str:
    pitch = meta.get("pitch_hz")
    words = {
        "sound": meta["sound"],
        "loudness": "quiet" if meta["gain_db"] < -18 else "loud" if meta["gain_db"] > -11 else "moderate",
        "pitch": "" if pitch is None else "low " if pitch < 300 else "high " if pitch > 900 else "mid-range ",
        "noise": f"{'faint' if meta['snr_db'] > 12 else 'heavy'} {meta['noise']} noise",
    }
    templates = (
        "a {loudness} {pitch}{sound} with {noise}",
        "a {pitch}{sound}",
        "the sound of a {sound} over {noise}",
        "{noise} and a {loudness} {sound}",
    )
    return templates[rng.integers(len(templates))].format(**words)


def encode_flac(wave: np.ndarray) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wave, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def audio_sample(rng: np.random.Generator, label: int) -> dict:
    """Sample members: ``flac`` clip (16 kHz mono), ``txt`` caption, ``json`` metadata."""
    wave, meta = render_clip(rng, label)
    return {"flac": encode_flac(wave), "txt": audio_caption(rng, meta), "json": meta}
