"""The results table copies values from the records: seeds averaged, failed and missing cells marked."""

from __future__ import annotations

import json
import statistics

from kdlsq_pl.report import report

FP32 = 90_856_000.0


def write(root, name, **rec):
    d = root / name
    d.mkdir(parents=True)
    (d / "result.json").write_text(json.dumps(rec))


def student(task, quant, wbits, seed, best, teacher, status="finished"):
    return dict(stage="student", method="kdlsq", task=task, quant=quant, seed=seed, status=status, best=best,
                metric={"mrpc": "f1", "stsb": "pearson"}[task], teacher_metric=teacher,
                bits={"weight_bits": wbits, "embedding_bits": wbits, "act_bits": 8},
                size_bytes=FP32 * wbits / 32, fp32_bytes=FP32, compression_ratio=32 / wbits)


def test_table_shape_values_and_failures(tmp_path):
    root = tmp_path / "outputs"
    write(root, "a", **student("mrpc", "w2a8", 2, 1, 80.0, 87.0))
    write(root, "b", **student("mrpc", "w2a8", 2, 2, 82.0, 86.0))
    write(root, "c", **student("stsb", "w2a8", 2, 1, 85.5, 88.0))
    write(root, "d", **student("mrpc", "w8a8", 8, 1, 86.5, 87.0))
    write(root, "e", **student("stsb", "w8a8", 8, 1, None, 88.0, status="failed"))
    # a cell that failed before training (bad input) has no bits or size: the row takes them from a finished one
    write(root, "0", stage="student", method="kdlsq", task="stsb", quant="w8a8", seed=2, status="failed", error="ConfigError: x")
    # a teacher-stage record of another (e.g. retrained) teacher does not replace the one the students used
    write(root, "g", stage="teacher", task="mrpc", seed=1, status="finished", best=50.0, metric="f1")
    (root / "f").mkdir()
    (root / "f" / "result.json").write_text("{truncated")  # a corrupt record counts as failed, not as a crash
    text = report(root, tmp_path / "rep")
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    header, rows = lines[0], {line.split(" | ")[0][2:]: line.split(" | ") for line in lines[1:]}
    assert header == "| model | W-E-A bits | size (MB) | file (MB) | vs FP32 | MRPC (f1) | STS-B (pearson) | avg |"
    assert list(rows) == ["teacher (FP32)", "kdlsq w8a8", "kdlsq w2a8"]
    t = rows["teacher (FP32)"]
    assert t[5] == f"{statistics.mean([87.0, 86.0]):.2f} +- {statistics.stdev([87.0, 86.0]):.2f} (n=2)" and t[6] == "88.00 (n=1)"
    w2 = rows["kdlsq w2a8"]
    assert w2[1:5] == ["2-2-8", f"{FP32 / 16 / 1e6:.1f}", "-", "16.0x"]  # no packed file in these records
    assert w2[5] == "81.00 +- 1.41 (n=2)" and w2[6] == "85.50 (n=1 of 2)" and w2[7].rstrip(" |") == f"{(81.0 + 85.5) / 2:.2f}"
    w8 = rows["kdlsq w8a8"]
    assert w8[1:5] == ["8-8-8", f"{FP32 / 4 / 1e6:.1f}", "-", "4.0x"]
    assert w8[5] == "86.50 (n=1 of 2)" and w8[6] == "FAILED (2)" and w8[7].rstrip(" |") == "-"
    csv_rows = (tmp_path / "rep" / "results.csv").read_text().splitlines()
    assert len(csv_rows) == 1 + 8 and (tmp_path / "rep" / "results.png").stat().st_size > 1000


def test_no_records_is_a_one_line_error(tmp_path, capsys):
    import pytest

    from kdlsq_pl.report import main
    with pytest.raises(SystemExit) as e:
        main(["--root", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith(f"error: no result.json under {tmp_path}")
    assert not (tmp_path / "report").exists()  # nothing written


def test_mean_std_over_three_seeds_by_hand_and_shared_teacher_counted_once(tmp_path):
    root = tmp_path / "outputs"
    for seed, best in ((1, 84.0), (2, 85.0), (3, 87.0)):  # three student seeds distilled from one teacher
        write(root, f"s{seed}", **student("mrpc", "w2a8", 2, seed, best, 88.6), teacher_dir="/store/mrpc/seed42-abc")
    write(root, "w8", **student("mrpc", "w8a8", 8, 1, 88.0, 88.6), teacher_dir="/store/mrpc/seed42-abc")
    text = report(root, tmp_path / "rep")
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in text.splitlines()[1:] if line.startswith("| ") and "---" not in line}
    mean = (84.0 + 85.0 + 87.0) / 3  # 85.333
    std = (((84.0 - mean) ** 2 + (85.0 - mean) ** 2 + (87.0 - mean) ** 2) / 2) ** 0.5  # sample std: 1.5275
    assert rows["kdlsq w2a8"][5] == f"{mean:.2f} +- {std:.2f} (n=3)" == "85.33 +- 1.53 (n=3)"
    assert rows["kdlsq w8a8"][5] == "88.00 (n=1 of 3)"  # fewer seeds than the fullest cell: it says so
    assert rows["teacher (FP32)"][5] == "88.60 (n=1)"  # one teacher, not three copies of it


def test_mixed_precision_row_shows_its_average_bits_and_packed_file(tmp_path):
    root = tmp_path / "outputs"
    write(root, "u", **student("mrpc", "w2a8", 2, 1, 84.0, 86.0), packed_bytes=6_050_000)
    mixed = student("mrpc", "w2a8_emb4", 2, 1, 85.0, 86.0)
    # 12.0M embedding values at 4 bits, 10.6M Linear weights at 2: (12.0 * 4 + 10.6 * 2) / 22.6 = 3.0619...
    write(root, "m", **mixed, bit_overrides={"*.embeddings.*": 4}, avg_weight_bits=(12.0 * 4 + 10.6 * 2) / 22.6,
          packed_bytes=11_900_000)
    text = report(root, tmp_path / "rep")
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in text.splitlines()[1:] if line.startswith("| ") and "---" not in line}
    assert rows["kdlsq w2a8_emb4"][1] == "2-2-8, mixed (3.06 avg)" and rows["kdlsq w2a8_emb4"][3] == "11.90"
    assert rows["kdlsq w2a8"][1] == "2-2-8" and rows["kdlsq w2a8"][3] == "6.05"
    assert list(rows)[1:] == ["teacher (FP32)", "kdlsq w2a8_emb4", "kdlsq w2a8"]  # by (average) weight bits, highest first


def test_shallow_students_show_their_depth(tmp_path):
    root = tmp_path / "outputs"
    write(root, "six", **student("mrpc", "w2a8", 2, 1, 84.0, 86.0), student_layers=6, teacher_layers=6)
    three = student("mrpc", "w2a8", 2, 1, 81.0, 86.0) | {"method": "kdlsq_successor"}
    write(root, "three", **three, student_layers=3, teacher_layers=6)
    fp = student("mrpc", "fp32", 32, 1, 84.2, 86.0) | {"method": "theseus", "size_bytes": 69_562_376.0, "compression_ratio": 1.31,
                                                         "bits": {"weight_bits": 32, "embedding_bits": 32, "act_bits": 32}}
    write(root, "theseus", **fp, student_layers=3, teacher_layers=6)
    write(root, "0theseus", **(fp | {"seed": 2}))  # a record written before the depth fields: its row still says 3 layers
    text = report(root, tmp_path / "rep")
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in text.splitlines()[1:] if line.startswith("| ") and "---" not in line}
    assert rows["kdlsq w2a8"][1] == "2-2-8" and rows["kdlsq_successor w2a8"][1] == "2-2-8, 3 layers"
    assert rows["theseus fp32"][1:3] == ["32-32-32, 3 layers", "69.6"] and rows["theseus fp32"][4] == "1.3x"


def test_theseus_successor_file_size_from_its_record(tmp_path):
    # a successor has no packed export: its saved FP32 safetensors (file_bytes) is the file in the table and plot
    root = tmp_path / "outputs"
    fp = student("mrpc", "fp32", 32, 1, 84.2, 86.0) | {"method": "theseus", "size_bytes": 69_562_376.0, "compression_ratio": 1.31,
                                                         "bits": {"weight_bits": 32, "embedding_bits": 32, "act_bits": 32}}
    write(root, "with", **fp, file_bytes=69_568_832)
    write(root, "without", **student("mrpc", "w2a8", 2, 1, 84.0, 86.0))
    text = report(root, tmp_path / "rep")
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in text.splitlines()[1:] if line.startswith("| ") and "---" not in line}
    assert rows["theseus fp32"][3] == "69.57" and rows["kdlsq w2a8"][3] == "-"


def test_plot_series_joins_the_bits_of_a_method_and_keeps_variants_apart():
    """One line per method across bit-widths: the bits part of the quant name is dropped (w8a8, w2e4a8, fp32), what
    else the name says (``_ibert``) stays, and a mixed-precision setting is its own line."""
    from kdlsq_pl.report import series

    assert series("kdlsq w8a8", {}) == series("kdlsq w2a8", {}) == series("kdlsq w2e4a8", {}) == "kdlsq"
    assert series("kdlsq_per_channel w2a8_ibert", {}) == "kdlsq_per_channel_ibert"
    assert series("theseus fp32", {}) == "theseus"
    assert series("kdlsq w2a8_emb4", {"mixed": True}) == "kdlsq w2a8_emb4"


def test_plot_legend_names_series_found_only_in_a_later_task(tmp_path, monkeypatch):
    """Each row of the plot has one legend, outside its last panel on the right, and it names every series of the row:
    here the ``lsq`` rows exist for STS-B only (the second panel) and the ``kdlsq`` ones for MRPC only (the first),
    and the legend lists both."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root = tmp_path / "outputs"
    write(root, "a", **student("mrpc", "w2a8", 2, 1, 80.0, 87.0) | {"packed_bytes": 6e6})
    write(root, "b", **student("stsb", "w2a8", 2, 1, 85.5, 88.0) | {"method": "lsq", "packed_bytes": 6e6})
    figures = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (figures.append(fig), close(fig)))
    report(root, tmp_path / "rep")
    fig = figures[0]
    top, bottom = fig.axes[1], fig.axes[3]  # row-major: mrpc top, stsb top, mrpc bottom, stsb bottom
    assert sorted(t.get_text() for t in top.get_legend().get_texts()) == ["kdlsq", "lsq", "teacher (FP32)"]
    assert fig.axes[0].get_legend() is None and fig.axes[2].get_legend() is None
    assert {"kdlsq w2a8", "lsq w2a8"} <= {t.get_text() for t in bottom.get_legend().get_texts()}
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    renderer = FigureCanvasAgg(fig).get_renderer()  # the figure is closed: draw it on a fresh canvas
    for ax in (top, bottom):  # outside the panel: the legend's left edge is right of the axes' right edge
        assert ax.get_legend().get_window_extent(renderer).x0 > ax.get_window_extent(renderer).x1


def test_plot_bottom_row_points_take_their_method_colour_and_a_marker_per_bits(tmp_path, monkeypatch):
    """A point of the size panel has the colour of its method's line in the bits panel above it (two methods, two
    bit-widths: two colours, not four), its marker tells the bits (8: circle, 2: down triangle); the teacher's marker
    is a square, a mixed setting's a diamond, an FP32 student's a plus."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgba

    from kdlsq_pl.report import point_marker

    root = tmp_path / "outputs"
    for i, (method, quant, bits, f1) in enumerate([("kdlsq", "w8a8", 8, 86.0), ("kdlsq", "w2a8", 2, 83.0),
                                                    ("lsq", "w8a8", 8, 85.0), ("lsq", "w2a8", 2, 80.0)]):
        write(root, f"s{i}", **student("mrpc", quant, bits, 1, f1, 87.0) | {"method": method, "packed_bytes": bits * 1e6})
    figures = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (figures.append(fig), close(fig)))
    report(root, tmp_path / "rep")
    top, bottom = figures[0].axes[0], figures[0].axes[1]
    line_colour = {label: to_rgba(h.lines[0].get_color()) for h, label in zip(*top.get_legend_handles_labels())
                   if label != "teacher (FP32)"}
    assert len(set(line_colour.values())) == 2
    points = dict(zip(*reversed(bottom.get_legend_handles_labels())))
    for label, method, marker in [("kdlsq w8a8", "kdlsq", "o"), ("kdlsq w2a8", "kdlsq", "v"),
                                  ("lsq w8a8", "lsq", "o"), ("lsq w2a8", "lsq", "v")]:
        assert to_rgba(points[label].lines[0].get_color()) == line_colour[method]
        assert points[label].lines[0].get_marker() == marker
    assert point_marker("teacher (FP32)", {"wbits": 32}) == "s" and point_marker("x", {"wbits": 3.05, "mixed": True}) == "D"
    assert point_marker("theseus fp32", {"wbits": 32}) == "P"
