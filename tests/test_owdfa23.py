"""The original OW-DFA benchmark from meta CSVs, read as CPL's `DFA` does, on small hand-built
CSVs."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from omegaconf import OmegaConf
from PIL import Image

from owdfa_bench.data.owdfa23 import (
    build_owdfa23_splits,
    load_owdfa23_protocol,
    meta_image_paths,
    rebase_path,
    split_meta,
)
from owdfa_bench.protocols import load_registry

REPO = Path(__file__).resolve().parents[1]
P1_CSV = "Protocol1_openset_fake_large_merge_meta.csv"
P2_CSV = "Protocol2_openset_real_fake_large_merge_meta.csv"
P1 = {"protocol_key": "p1"}
P2 = {"protocol_key": "p2"}


def p2_frame(per_class: int = 10) -> pd.DataFrame:
    """A Protocol-2 CSV: known classes 0-8 (6 tag-1, 3 tag-2, 1 tag-0 rows each), novel 9-21
    (8 tag-2, 2 tag-0 rows each), in the registry's order, with the reference's columns."""
    protocol = load_registry("owdfa23")["protocols"]["p2"]
    classes = [(c, True) for c in protocol["known"]] + [(c, False) for c in protocol["novel"]]
    rows = []
    for label, (c, known) in enumerate(classes):
        tags = [1] * 6 + [2] * 3 + [0] if known else [2] * 8 + [0] * 2
        for i, tag in enumerate(tags[:per_class]):
            rows.append(
                {
                    "img_name": f"{i:03d}",
                    "label": label,
                    "method": c["method"],
                    "forgery_type": "RealFace" if c["method"] == "Real" else "IdentitySwap",
                    "forgery_label": 0,
                    "face_type": int(c["method"] == "Real"),
                    "tag": tag,
                    "code": "None",
                    "image_source": c["source"],
                    "img_path": f"/orig/root/Type/{c['method']}/{c['source']}/{i:03d}.png",
                    "compression": "c23",
                    "frame_idx": i,
                }
            )
    return pd.DataFrame(rows)


def p1_frame() -> pd.DataFrame:
    """Protocol 1 as the notebook derives it: drop real faces, relabel x-1 below 9, else x-2."""
    df = p2_frame()
    df = df[df.face_type != 1].copy()
    df["label"] = df.label.apply(lambda x: x - 1 if x < 9 else x - 2)
    return df.reset_index(drop=True)


@pytest.fixture
def meta_dir(tmp_path):
    folder = tmp_path / "meta_data"
    folder.mkdir()
    p2_frame().to_csv(folder / P2_CSV, index=False)
    p1_frame().to_csv(folder / P1_CSV, index=False)
    return folder


def test_registry_matches_the_reference_protocols():
    p1, p2 = load_owdfa23_protocol(P1), load_owdfa23_protocol(P2)
    assert (p1.num_classes, p1.num_known, p1.csv) == (20, 8, P1_CSV)
    assert (p2.num_classes, p2.num_known, p2.csv) == (22, 9, P2_CSV)
    reals = {"Real (FaceForensics++)", "Real (CelebDF)"}
    assert set(p2.known) - set(p1.known) == {"Real (FaceForensics++)"}
    assert set(p1.known) | set(p1.novel) == (set(p2.known) | set(p2.novel)) - reals
    assert p2.known[0] == "Real (FaceForensics++)" and p2.novel[0] == "Real (CelebDF)"


def test_hydra_protocol_and_data_files():
    for key in ("p1", "p2"):
        cfg = OmegaConf.load(REPO / "conf" / "protocol" / f"owdfa23_{key}.yaml")
        assert (cfg.name, cfg.benchmark, cfg.protocol_key) == (f"owdfa23_{key}", "owdfa23", key)
    data = yaml.safe_load((REPO / "conf" / "data" / "owdfa23.yaml").read_text())
    assert data["name"] == "owdfa23" and data["split_seed"] == 2000
    for key in ("root", "meta_dir", "image_size", "crop_face", "cache_dir", "predictor_path"):
        assert key in data


def test_p2_splits_follow_tags_and_the_per_group_80_20_cut(meta_dir):
    lab, unlab, test, num_known, names = build_owdfa23_splits(meta_dir, P2)
    assert num_known == 9 and len(names) == 22
    assert names[0] == "Real (FaceForensics++)" and names[9] == "Real (CelebDF)"
    # Per class: known 9 kept rows (6 tag-1 + 3 tag-2) -> round(7.2) = 7 train, 2 test;
    # novel 8 kept rows -> round(6.4) = 6 train, 2 test. Tag-0 rows appear nowhere.
    train_counts = Counter(y for _, y in lab + unlab)
    assert all(train_counts[y] == (7 if y < 9 else 6) for y in range(22))
    assert Counter(y for _, y in test) == {y: 2 for y in range(22)}
    assert all(y < 9 for _, y in lab)
    df = p2_frame()
    tag_of = {(p, y): t for p, y, t in zip(df.img_path, df.label, df.tag)}
    assert all(tag_of[r] == 1 for r in lab) and all(tag_of[r] == 2 for r in unlab)
    assert {tag_of[r] for r in test} == {1, 2}  # the test split keeps both tags
    paths = [p for p, _ in lab + unlab + test]
    assert len(paths) == len(set(paths)) == int((df.tag != 0).sum())


def test_split_groups_train_rows_by_sorted_source_then_label(meta_dir):
    df = pd.read_csv(meta_dir / P2_CSV)
    train, test = split_meta(df, 2000)
    keys = list(zip(train.image_source, train.label))
    assert keys == sorted(keys)  # 'ForgeryNIR+' < 'ForgeryNet' in Python's string order
    assert list(test.index) == sorted(test.index)  # test keeps the CSV order
    group = df[(df.tag != 0) & (df.image_source == "DFFD") & (df.label == 6)]
    expected = list(group.sample(frac=0.8, random_state=2000).img_path)
    assert list(train[(train.image_source == "DFFD") & (train.label == 6)].img_path) == expected


def test_split_is_reproducible_and_seed_dependent(meta_dir):
    a = build_owdfa23_splits(meta_dir, P2, split_seed=2000)
    assert build_owdfa23_splits(meta_dir, P2, split_seed=2000) == a
    b = build_owdfa23_splits(meta_dir, P2, split_seed=7)
    assert set(b[2]) != set(a[2])


def test_p1_has_eight_known_fakes(meta_dir):
    lab, unlab, test, num_known, names = build_owdfa23_splits(
        meta_dir, OmegaConf.create({"name": "owdfa23_p1", "protocol_key": "p1"})
    )
    assert num_known == 8 and len(names) == 20
    assert not any(n.startswith("Real") for n in names)
    assert {y for _, y in lab} == set(range(8))
    assert {y for _, y in unlab + test} == set(range(20))


def test_known_labels_must_be_the_prefix(meta_dir):
    df = p2_frame()
    df["label"] = df.label.replace({8: 9, 9: 8})  # a known class given a novel id
    df.to_csv(meta_dir / P2_CSV, index=False)
    with pytest.raises(ValueError, match=r"exactly 0\.\.8"):
        build_owdfa23_splits(meta_dir, P2)


def test_classes_must_match_the_protocol_by_name(meta_dir):
    df = p2_frame()
    df.loc[df.method == "FOMM", "method"] = "FOMM-v2"
    df.to_csv(meta_dir / P2_CSV, index=False)
    with pytest.raises(ValueError, match=r"unexpected \['FOMM-v2 \(ForgeryNet\)'\]"):
        build_owdfa23_splits(meta_dir, P2)


def test_a_label_spanning_two_classes_is_refused(meta_dir):
    df = p2_frame()
    df.loc[df.label == 1, "label"] = 2
    df.to_csv(meta_dir / P2_CSV, index=False)
    with pytest.raises(ValueError, match="one \\(image_source, method\\) pair"):
        build_owdfa23_splits(meta_dir, P2)


def test_misnamed_csv_error_names_files_folder_and_closest_match(tmp_path):
    folder = tmp_path / "meta"
    folder.mkdir()
    p1_frame().to_csv(folder / "protocol1_openset_fake_large_merge_meta.csv", index=False)
    (folder / "notes.csv").write_text("a\n1\n")
    with pytest.raises(FileNotFoundError) as err:
        build_owdfa23_splits(folder, P1)
    message = str(err.value)
    assert P1_CSV in message and P2_CSV in message and str(folder) in message
    assert "notes.csv" in message
    assert "Did you mean protocol1_openset_fake_large_merge_meta.csv?" in message


def test_the_other_protocol_csv_is_never_suggested(tmp_path):
    p2_frame().to_csv(tmp_path / P2_CSV, index=False)
    with pytest.raises(FileNotFoundError) as err:
        build_owdfa23_splits(tmp_path, P1)
    assert P2_CSV in str(err.value) and "Did you mean" not in str(err.value)


def test_missing_meta_folder_and_unset_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_owdfa23_splits(tmp_path / "absent", P1)
    with pytest.raises(ValueError, match="data.meta_dir"):
        build_owdfa23_splits(None, P1)
    with pytest.raises(KeyError, match="p9"):
        build_owdfa23_splits(tmp_path, {"protocol_key": "p9"})


def test_missing_columns_and_bad_tags(meta_dir):
    p2_frame().drop(columns=["image_source"]).to_csv(meta_dir / P2_CSV, index=False)
    with pytest.raises(ValueError, match="missing columns \\['image_source'\\]"):
        build_owdfa23_splits(meta_dir, P2)
    df = p2_frame()
    df.loc[0, "tag"] = 3
    df.to_csv(meta_dir / P2_CSV, index=False)
    with pytest.raises(ValueError, match="tag values \\[.3.\\]"):
        build_owdfa23_splits(meta_dir, P2)


def test_image_root_rebases_paths_and_locates_meta_data(meta_dir):
    root = meta_dir.parent
    lab, _, _, _, _ = build_owdfa23_splits(None, P2, image_root=root)
    path = Path(lab[0][0])
    assert path.parents[3] == root  # <root>/<type>/<method>/<source>/<file>
    assert rebase_path("Type/M/S/f.png", "/new") == "/new/Type/M/S/f.png"
    assert rebase_path("/a/b/Type/M/S/f.png", None) == "/a/b/Type/M/S/f.png"


def test_meta_image_paths_is_the_union_of_kept_rows(meta_dir):
    paths = meta_image_paths(meta_dir)
    df = p2_frame()
    assert sorted(paths) == sorted(df.loc[df.tag != 0, "img_path"])  # P1 rows are a subset


def test_prepare_and_cached_rows_for_owdfa23(meta_dir):
    pytest.importorskip("dlib")
    from owdfa_bench.data.faces import cli_prepare, resolve_cached_rows

    root = meta_dir.parent
    pixel = Image.new("RGB", (8, 8), (255, 0, 0))
    for path in meta_image_paths(None, root):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        pixel.save(path)
    args = ["data=owdfa23", f"data.root={root}", "data.image_size=8", "--workers", "1"]
    assert cli_prepare(args + ["--no-progress"]) == 0
    lab, _, test, _, _ = build_owdfa23_splits(None, P1, image_root=root)
    data_cfg = {"name": "owdfa23", "root": str(root), "image_size": 8, "crop_face": True}
    cached = resolve_cached_rows(test, data_cfg)
    assert [y for _, y in cached] == [y for _, y in test]
    assert np.asarray(Image.open(cached[0][0])).tolist()[0][0] == [255, 0, 0]


def test_a_leaking_meta_csv_fails_naming_the_rows(meta_dir):
    """Duplicated CSV rows land on both sides of the 80/20 cut; the shared check refuses them."""
    from conftest import compose_config

    from owdfa_bench.data.datamodule import build_splits

    df = p2_frame()
    leaked = df[df.tag != 0].copy()
    leaked["img_name"] += "-copy"  # a second row of each image: another CSV row, the same file
    pd.concat([df, leaked]).to_csv(meta_dir / P2_CSV, index=False)
    cfg = compose_config(
        ["data=owdfa23", "protocol=owdfa23_p2", f"data.meta_dir={meta_dir}", "method=cal"]
    )
    with pytest.raises(
        ValueError, match="the splits of data=owdfa23 protocol=owdfa23_p2 leak"
    ) as err:
        build_splits(cfg.data, cfg.protocol)
    message = str(err.value)
    assert "labelled and test share" in message and "unlabelled and test share" in message
    assert "/orig/root/Type/" in message  # the rows, by image path
