#!/usr/bin/env python3
"""Writes the demo's pump recordings (models/pump-sensor/*.csv): SYNTHETIC process data at
1 Hz in SKAB's CSV layout, made here so the repository ships a sensor sample it may license
freely (SKAB itself is GPL-3.0 and stays in ../shared/data).

- normal.csv: 900 rows of a healthy pump: flow, pressure and current move together with the
  demand, vibration RMS with the flow; sensor noise on each.
- replay.csv: 240 rows; rows 80-159 have a partly closed inlet valve (flow down, pressure
  up, current down, vibration up: cavitation), labelled in the `anomaly` column.

Deterministic (fixed seed): running it again gives the same files.
"""
import math
import os
import random

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "pump-sensor")


def rows(n, seed, fault=range(0)):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        demand = 0.6 * math.sin(2 * math.pi * i / 300.0) + rng.gauss(0, 0.15)
        bad = i in fault
        flow = 32.0 + demand + rng.gauss(0, 0.25) - (2.6 if bad else 0.0)
        pressure = 0.10 + 0.04 * demand + rng.gauss(0, 0.01) + (0.12 if bad else 0.0)
        current = 1.00 + 0.05 * demand + rng.gauss(0, 0.015) - (0.06 if bad else 0.0)
        vib = 0.027 + 0.002 * demand + abs(rng.gauss(0, 0.0008)) + (0.006 if bad else 0.0)
        out.append((vib, current, pressure, flow, int(bad)))
    return out


def write(name, data, start):
    path = os.path.join(HERE, name)
    with open(path, "w") as f:
        f.write("datetime;Accelerometer1RMS;Current;Pressure;Volume Flow RateRMS;anomaly;changepoint\n")
        for i, (vib, cur, p, q, a) in enumerate(data):
            t = start + i
            stamp = "2026-11-02 %02d:%02d:%02d" % (t // 3600, (t // 60) % 60, t % 60)
            f.write("%s;%.5f;%.4f;%.5f;%.3f;%d;0\n" % (stamp, vib, cur, p, q, a))
    print("wrote", path, len(data), "rows")


os.makedirs(HERE, exist_ok=True)
write("normal.csv", rows(900, 1), 8 * 3600)
write("replay.csv", rows(240, 2, range(80, 160)), 10 * 3600)
