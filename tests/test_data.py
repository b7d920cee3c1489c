"""Tests for common.data: synthetic regional records, the public corpus, loaders and user-level splits."""

import hashlib
import json
import os
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common.data.corpus import generate_public_corpus
from common.data.partition import client_partition, split_heldout, unit_bucket
from common.data.records import Record, load_records, record_to_dict, write_jsonl
from common.data.synthetic import REGION_LOCALES, generate_region_records, write_region_dataset
from common.errors import DataError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def regions():
    return {
        region: generate_region_records(region, locales, seed=7, num_users=150)
        for region, locales in REGION_LOCALES.items()
    }


def by_user(records):
    users = defaultdict(list)
    for r in records:
        users[r.user_id].append(r)
    return users


# Independent re-implementations of the checksums, so the tests do not trust the generator's own code.


def nric_valid(nric):
    prefix, digits, letter = nric[0], nric[1:8], nric[8]
    total = sum(int(d) * w for d, w in zip(digits, (2, 7, 6, 5, 4, 3, 2), strict=True)) + (4 if prefix in "TG" else 0)
    table = {"S": "JZIHGFEDCBA", "T": "JZIHGFEDCBA", "F": "XWUTRQPNMLK", "G": "XWUTRQPNMLK"}[prefix]
    return table[total % 11] == letter


def bsn_valid(bsn):
    return len(bsn) == 9 and sum(int(d) * w for d, w in zip(bsn, (9, 8, 7, 6, 5, 4, 3, 2, -1), strict=True)) % 11 == 0


def dni_valid(dni):
    return re.fullmatch(r"\d{8}[A-Z]", dni) and "TRWAGMYFPDXBNJZSQVHLCKE"[int(dni[:8]) % 23] == dni[8]


def china_id_valid(cid):
    weights = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
    return "10X98765432"[sum(int(d) * w for d, w in zip(cid[:17], weights, strict=True)) % 11] == cid[17]


def steuer_id_valid(tid):
    if not re.fullmatch(r"[1-9]\d{10}", tid):
        return False
    product = 10
    for d in map(int, tid[:10]):
        product = ((d + product) % 10 or 10) * 2 % 11
    return (11 - product) % 10 == int(tid[10])


def luhn_valid(number):
    digits = [int(c) for c in number.replace(" ", "")][::-1]
    return sum(d if i % 2 == 0 else (2 * d - 9 if 2 * d > 9 else 2 * d) for i, d in enumerate(digits)) % 10 == 0


def iban_valid(iban):
    moved = iban[4:] + iban[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


# --- synthetic regional records -------------------------------------------------------------------------


def test_same_seed_gives_identical_records_and_other_seed_differs():
    a = generate_region_records("eu", REGION_LOCALES["eu"], seed=3, num_users=30)
    b = generate_region_records("eu", REGION_LOCALES["eu"], seed=3, num_users=30)
    c = generate_region_records("eu", REGION_LOCALES["eu"], seed=4, num_users=30)
    assert [record_to_dict(r) for r in a] == [record_to_dict(r) for r in b]
    assert [r.text for r in a] != [r.text for r in c]


def test_output_does_not_depend_on_hash_seed_or_global_random():
    code = (
        "import hashlib, json, random; random.seed(12345);"
        "from common.data.synthetic import generate_region_records as g;"
        "from common.data.records import record_to_dict as d;"
        "rs = [r for reg, loc in [('eu', ['de_DE', 'nl_NL']), ('sg', ['en_SG']), ('cn', ['zh_CN'])]"
        " for r in g(reg, loc, seed=1, num_users=15)];"
        "print(hashlib.sha256(json.dumps([d(r) for r in rs]).encode()).hexdigest())"
    )
    digests = set()
    for hash_seed in ("0", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run(
            [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True
        )
        digests.add(out.stdout.strip())
    assert len(digests) == 1


def test_every_region_yields_well_formed_records(regions):
    for region, records in regions.items():
        assert {r.region for r in records} == {region}
        assert {r.fields["kind"] for r in records} == {"ticket", "chat", "profile"}
        for r in records:
            assert re.fullmatch(rf"{region}-u\d{{5}}", r.user_id)
            assert r.fields["record_id"].startswith(f"{r.user_id}-r")
            assert r.fields["locale"] in REGION_LOCALES[region]
            assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", r.fields["created_at"])
            assert 20 <= len(r.text.split()) <= 90
        assert len({r.text for r in records}) == len(records)


def test_users_have_bounded_record_counts_and_reuse_their_pii(regions):
    for records in regions.values():
        for user_records in by_user(records).values():
            assert 2 <= len(user_records) <= 6
            for key in ("name", "email", "phone", "address", "national_id"):
                assert len({r.fields["pii"][key] for r in user_records if key in r.fields["pii"]}) <= 1


def test_recorded_pii_appears_in_the_text(regions):
    for records in regions.values():
        assert all(r.fields["pii"] for r in records)
        for r in records:
            for value in r.fields["pii"].values():
                assert value in r.text


def national_ids(records, locale=None):
    return [
        r.fields["pii"]["national_id"]
        for r in records
        if "national_id" in r.fields["pii"] and locale in (None, r.fields["locale"])
    ]


def test_national_id_and_payment_formats(regions):
    eu, us, sg, cn = regions["eu"], regions["us"], regions["sg"], regions["cn"]
    assert all(nric_valid(n) and re.fullmatch(r"[STFG]\d{7}[A-Z]", n) for n in national_ids(sg))
    assert all(bsn_valid(n) for n in national_ids(eu, "nl_NL"))
    assert all(dni_valid(n) for n in national_ids(eu, "es_ES"))
    assert all(steuer_id_valid(n) for n in national_ids(eu, "de_DE"))
    assert all(re.fullmatch(r"\d{15}|\d[\dAB]{14}", n) for n in national_ids(eu, "fr_FR"))
    assert all(re.fullmatch(r"[A-Z]{6}\d{2}[A-Z]\d{2}[A-Z]\d{3}[A-Z]", n) for n in national_ids(eu, "it_IT"))
    assert all(re.fullmatch(r"\d{3}-\d{2}-\d{4}", n) for n in national_ids(us))
    for r in cn:
        pii = r.fields["pii"]
        if "national_id" in pii:
            assert len(pii["national_id"]) == 18 and china_id_valid(pii["national_id"])
            if "dob" in pii:
                assert pii["national_id"][6:14] == pii["dob"].replace("-", "")
    cards = [r.fields["pii"]["card"] for rs in regions.values() for r in rs if "card" in r.fields["pii"]]
    ibans = [r.fields["pii"]["iban"] for r in eu if "iban" in r.fields["pii"]]
    assert cards and all(luhn_valid(c) for c in cards)
    assert ibans and all(iban_valid(i) for i in ibans)
    for r in sg:
        pii = r.fields["pii"]
        if "phone" in pii:
            assert re.fullmatch(r"\+65 [89]\d{3} \d{4}", pii["phone"])
        if "address" in pii:
            assert re.search(r", #\d{2}-\d{2,3}, .*Singapore \d{6}$", pii["address"])


def test_region_specific_topics(regions):
    texts = {region: " ".join(r.text for r in records) for region, records in regions.items()}
    assert "GDPR" in texts["eu"] and "SEPA" in texts["eu"]
    assert "CCPA" in texts["us"] and "sales tax" in texts["us"]
    assert "PDPA" in texts["sg"] and "PayNow" in texts["sg"] and "HDB" in texts["sg"]
    assert "PIPL" in texts["cn"] and "Alipay" in texts["cn"]


def test_consent_is_per_user_at_roughly_the_requested_rate():
    records = generate_region_records(
        "us", ["en_US"], seed=11, num_users=600, records_per_user=(1, 2), consent_rate=0.8
    )
    users = by_user(records)
    assert all(len({r.consent for r in rs}) == 1 for rs in users.values())
    rate = sum(rs[0].consent for rs in users.values()) / len(users)
    assert 0.74 < rate < 0.86


def test_a_few_records_carry_special_category_tags(regions):
    records = [r for rs in regions.values() for r in rs]
    tagged = [r for r in records if r.fields["tags"]]
    assert 0.02 < len(tagged) / len(records) < 0.09
    assert all(re.fullmatch(r"special:[a-z_]+", t) for r in tagged for t in r.fields["tags"])
    assert all(r.fields["tags"] == [] for r in records if r not in tagged)


def test_unknown_region_falls_back_to_its_locales_and_unknown_locale_is_rejected():
    records = generate_region_records("uk", ["en_GB"], seed=0, num_users=5)
    assert {r.region for r in records} == {"uk"} and all(r.fields["locale"] == "en_GB" for r in records)
    with pytest.raises(DataError, match="AVAILABLE_LOCALES"):
        generate_region_records("eu", ["xx_XX"], seed=0, num_users=5)


def test_write_region_dataset_shards_by_user_and_replaces_old_shards(tmp_path):
    (tmp_path / "part-00007.jsonl").write_text("stale\n")
    (tmp_path / "notes.md").write_text("keep me")
    paths = write_region_dataset("sg", ["en_SG"], tmp_path, seed=5, num_users=40, num_shards=3)
    assert [p.name for p in paths] == ["part-00000.jsonl", "part-00001.jsonl", "part-00002.jsonl"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.md"] + [p.name for p in paths]
    assert (tmp_path / "notes.md").read_text() == "keep me"
    shard_users = [{r.user_id for r in load_records([p], expected_region="sg")} for p in paths]
    assert all(shard_users) and not set.intersection(*shard_users)
    loaded = load_records([tmp_path], expected_region="sg", plain_text_consent=True)
    expected = generate_region_records("sg", ["en_SG"], seed=5, num_users=40)
    assert [record_to_dict(r) for r in loaded] == [record_to_dict(r) for r in expected]


# --- public corpus --------------------------------------------------------------------------------------


def test_public_corpus_is_deterministic_varied_and_free_of_pii():
    docs = generate_public_corpus(seed=0, num_documents=800)
    assert docs == generate_public_corpus(seed=0, num_documents=800)
    assert docs != generate_public_corpus(seed=1, num_documents=800)
    assert len(set(docs)) > 600
    assert all(25 <= len(d.split()) <= 85 for d in docs)
    text = "\n".join(docs)
    # Contact details and numbers appear only as the shop's own (support address, hotline,
    # order/invoice/tracking codes), never as a person's.
    assert set(re.findall(r"\S+@\S+", text)) <= {f"support@{d}.example.com." for d in ("shop", "help", "care")}
    assert len(re.findall(r"\+\d", text)) == len(re.findall(r"hotline \+\d", text))
    assert "#" not in text
    for word in ("refund", "delivery", "personal data", "bill", "courier", "plan"):
        assert word in text


def test_public_corpus_contains_no_person_names():
    from faker.providers.person.en_US import Provider as Names

    from common.data import corpus

    names = set(Names.first_names) | set(Names.last_names)
    words = set(re.findall(r"\b[A-Z][a-z]+\b", " ".join(generate_public_corpus(seed=2, num_documents=1500))))
    # Months, weekdays and the shop's cities and streets are public words, not people.
    public = {
        w for phrase in corpus._CITIES + corpus._STREETS + corpus._MONTHS + corpus._WEEKDAYS for w in phrase.split()
    }
    assert (words - public) & names <= {"Best", "Good", "Max"}  # ordinary words that happen to be names too


# --- loaders --------------------------------------------------------------------------------------------


def make_records(n=3, region="eu"):
    return [
        Record(
            text=f"ticket number {i} about a late parcel",
            region=region,
            user_id=f"u{i}",
            consent=i != 1,
            fields={"record_id": f"r{i}", "tags": ["special:health"] if i == 0 else [], "pii": {"x": "ü"}},
        )
        for i in range(n)
    ]


def test_jsonl_round_trip_leaves_no_temp_files(tmp_path):
    path = tmp_path / "eu" / "a.jsonl"
    write_jsonl(make_records(), path)
    assert load_records([path]) == make_records()
    assert [p.name for p in path.parent.iterdir()] == ["a.jsonl"]
    first = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
    assert list(first)[:4] == ["text", "region", "user_id", "consent"] and first["pii"] == {"x": "ü"}
    assert "ü" in path.read_text(encoding="utf-8")


def test_record_to_dict_refuses_fields_that_shadow_required_ones():
    with pytest.raises(ValueError, match="region"):
        record_to_dict(Record(text="t", region="eu", user_id="u", consent=True, fields={"region": "us"}))


def test_parquet_round_trip_keeps_extra_columns(tmp_path):
    rows = [record_to_dict(r) for r in make_records()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    assert load_records([tmp_path / "a.parquet"], expected_region="eu") == make_records()


def test_plain_text_lines_are_separate_users_with_attested_consent(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("first note about my order\n\n  second note  \n", encoding="utf-8")
    records = load_records([path], expected_region="sg", plain_text_consent=False)
    assert [(r.text, r.region, r.user_id, r.consent) for r in records] == [
        ("first note about my order", "sg", "notes.txt:1", False),
        ("second note", "sg", "notes.txt:3", False),
    ]


def test_folders_are_searched_recursively_in_sorted_order_ignoring_other_files(tmp_path):
    write_jsonl(make_records(1), tmp_path / "b" / "z.jsonl")
    (tmp_path / "a.txt").write_text("a plain line\n")
    (tmp_path / "readme.md").write_text("not data")
    records = load_records([tmp_path], expected_region="eu", plain_text_consent=True)
    assert [r.user_id for r in records] == ["a.txt:1", "u0"]


def test_loading_never_modifies_files(tmp_path):
    path = tmp_path / "a.jsonl"
    write_jsonl(make_records(), path)
    before = (path.read_bytes(), path.stat().st_mtime_ns)
    load_records([tmp_path])
    with pytest.raises(DataError):
        load_records([path], expected_region="us")
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before


def write_lines(path, *lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


GOOD = '{"text": "hello there", "region": "eu", "user_id": "u1", "consent": true}'


@pytest.mark.parametrize(
    "bad_line, expected",
    [
        ('{"text": "hi", "region": "eu"', "invalid JSON"),
        ('["text", "region"]', "expected a JSON object, got list"),
        ('{"text": "hi", "region": "eu"}', "missing required field(s) ['user_id', 'consent']"),
        (
            '{"text": "hi", "region": "eu", "user_id": 42, "consent": true}',
            "'user_id' must be a non-empty string, got int",
        ),
        ('{"text": "hi", "region": "eu", "user_id": "u", "consent": "yes"}', "'consent' must be a boolean, got str"),
        ('{"text": "  ", "region": "eu", "user_id": "u", "consent": true}', "'text' must be a non-empty string"),
        ('{"text": "hi", "region": "eu", "user_id": "", "consent": true}', "'user_id' must be a non-empty string"),
    ],
)
def test_malformed_jsonl_lines_name_file_line_and_problem(tmp_path, bad_line, expected):
    path = write_lines(tmp_path / "bad.jsonl", GOOD, "", bad_line)
    with pytest.raises(DataError) as err:
        load_records([path])
    assert "bad.jsonl line 3" in str(err.value) and expected in str(err.value)


def test_non_utf8_bytes_name_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(GOOD.encode() + b'\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin1\.jsonl line 2: .*must be UTF-8"):
        load_records([path])


@pytest.mark.parametrize(
    "setup, expected",
    [
        (lambda d: d / "missing.jsonl", "missing.jsonl: no such file or folder"),
        (lambda d: (d / "empty_dir").mkdir() or d / "empty_dir", "empty_dir: folder holds no data files"),
        (lambda d: write_lines(d / "blank.jsonl", "", "  "), "blank.jsonl: the file holds no records"),
        (lambda d: write_lines(d / "data.csv", "text,region"), "data.csv: CSV cells carry no types"),
        (lambda d: write_lines(d / "broken.parquet", "not parquet"), "broken.parquet: not a readable Parquet file"),
    ],
)
def test_bad_paths_and_files_are_named(tmp_path, setup, expected):
    with pytest.raises(DataError, match=re.escape(expected)):
        load_records([setup(tmp_path)], expected_region="eu", plain_text_consent=True)


def test_parquet_missing_columns_and_bad_row_types(tmp_path):
    pq.write_table(pa.table({"text": ["hi"], "region": ["eu"]}), tmp_path / "cols.parquet")
    with pytest.raises(DataError, match=r"cols\.parquet: .*lacks column\(s\) \['user_id', 'consent'\]"):
        load_records([tmp_path / "cols.parquet"])
    pq.write_table(
        pa.table({"text": ["a", "b"], "region": ["eu", "eu"], "user_id": [1, 2], "consent": [True, True]}),
        tmp_path / "types.parquet",
    )
    with pytest.raises(DataError, match=r"types\.parquet row 1: field 'user_id' must be a non-empty string, got int"):
        load_records([tmp_path / "types.parquet"])


def test_plain_text_needs_attested_consent_and_a_region(tmp_path):
    path = write_lines(tmp_path / "notes.txt", "a note")
    with pytest.raises(
        DataError,
        match=r"notes\.txt: plain-text files carry no consent field.*"
        r"regions\.eu\.data\.plain_text_consent=true",
    ):
        load_records([path], expected_region="eu")
    with pytest.raises(DataError, match=r"notes\.txt: plain-text files carry no region"):
        load_records([path], plain_text_consent=True)


def test_gzipped_jsonl_and_json_arrays_load_like_jsonl(tmp_path):
    import gzip

    rows = [record_to_dict(r) for r in make_records()]
    with gzip.open(tmp_path / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "b.json").write_text(json.dumps(rows), encoding="utf-8")
    assert load_records([tmp_path / "a.jsonl.gz"]) == load_records([tmp_path / "b.json"]) == make_records()


@pytest.mark.parametrize(
    "name, content, expected",
    [
        (
            "lines.json",
            GOOD + "\n" + GOOD + "\n",
            "lines.json line 2: invalid JSON (Extra data). It looks like JSON Lines",
        ),
        ("object.json", GOOD, "object.json: expected a JSON array of record objects, got a dict"),
        ("items.json", "[1]", "items.json item 1: expected a JSON object, got int"),
        ("empty.json", "  \n", "empty.json: the file holds no records"),
        ("cut.jsonl.gz", b"\x1f\x8b\x08\x00", "cut.jsonl.gz: not a complete gzip file"),
        (
            "tag.jsonl",
            GOOD[:-1] + ', "tags": "special:health"}',
            "tag.jsonl line 1: field 'tags' must be a list of strings",
        ),
    ],
)
def test_bad_json_gzip_and_tags_name_the_problem(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError, match=re.escape(expected)):
        load_records([path])


def test_a_folder_lists_what_it_skips_and_refuses_what_could_hold_records(tmp_path):
    from common.data.records import scan_data_paths

    write_jsonl(make_records(1), tmp_path / "a.jsonl")
    for name in (".partial.jsonl.tmp", "notes.md", "fedsov-data.json"):
        (tmp_path / name).write_text("{}")
    scan = scan_data_paths([tmp_path])
    assert scan.files == [tmp_path / "a.jsonl"]
    assert {p.name: why for p, why in scan.skipped} == {
        ".partial.jsonl.tmp": "hidden file",
        "notes.md": "documentation, not records",
        "fedsov-data.json": "fedsov's record of how it generated this synthetic data, not records",
    }
    for name in ("export.csv", "dump.json.gz", "sheet.xlsx"):
        (tmp_path / name).write_text("x")
    with pytest.raises(DataError) as err:
        scan_data_paths([tmp_path])
    assert "3 file(s) in the data folders are not in a format fedsov reads" in str(err.value)
    assert "export.csv (CSV cells carry no types" in str(err.value)
    assert "dump.json.gz (of the compressed" in str(err.value)


def test_pii_overlaps_are_resolved_as_before_longest_first(monkeypatch):
    """The neighbour check keeps exactly the spans the all-pairs rule kept, on random overlapping spans."""
    import random

    import common.pii as pii

    def all_pairs(found):
        kept = []
        for span in sorted(found, key=lambda s: (-(s.end - s.start), s.start)):
            if all(span.end <= k.start or span.start >= k.end for k in kept):
                kept.append(span)
        return sorted(kept, key=lambda s: s.start)

    class Found:
        def __init__(self, spans):
            self.results = [type("Result", (), {"start": a, "end": b}) for a, b in spans]

        def analyze(self, text, entities, nlp_artifacts):
            return self.results

    rng = random.Random(0)
    for _ in range(300):
        spans = [(a, a + rng.randint(1, 15)) for a in (rng.randint(0, 100) for _ in range(rng.randint(0, 40)))]
        found = Found(spans)
        monkeypatch.setattr(pii, "_recognizers", lambda entities, found=found: [("X", found)])
        expected = all_pairs([pii.PiiSpan("X", a, b, "x" * (b - a)) for a, b in spans])
        assert pii.PiiDetector(["EMAIL_ADDRESS"]).find("x" * 200) == expected


def test_records_from_another_region_are_refused(tmp_path):
    path = tmp_path / "mixed.jsonl"
    write_jsonl(make_records(2, "eu") + make_records(1, "us"), path)
    with pytest.raises(DataError, match=r"mixed\.jsonl line 3: record region 'us' does not match .* 'eu'"):
        load_records([path], expected_region="eu")


# --- partitions -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def many_records():
    return [
        Record(text=f"text {u}-{k}", region="eu", user_id=f"user-{u}", consent=True)
        for u in range(400)
        for k in range(u % 3 + 1)
    ]


def test_unit_bucket_is_stable_and_in_range():
    assert unit_bucket("user-1", "heldout") == unit_bucket("user-1", "heldout")
    assert unit_bucket("user-1", "heldout") != unit_bucket("user-1", "client")
    expected = (int.from_bytes(hashlib.sha256(b"heldout:user-1").digest()[:8], "big") >> 11) / 2**53
    assert unit_bucket("user-1", "heldout") == expected
    assert all(0 <= unit_bucket(f"u{i}", "s") < 1 for i in range(1000))


def test_split_heldout_keeps_users_together(many_records):
    train, heldout = split_heldout(many_records, fraction=0.2)
    assert len(train) + len(heldout) == len(many_records)
    train_users, heldout_users = {r.user_id for r in train}, {r.user_id for r in heldout}
    assert not train_users & heldout_users
    assert 0.13 < len(heldout_users) / 400 < 0.27
    assert split_heldout(list(reversed(many_records)), fraction=0.2)[1] == list(reversed(heldout))
    assert split_heldout(many_records, fraction=0.0) == (many_records, [])


def test_client_partitions_are_disjoint_and_cover_everything(many_records):
    parts = [client_partition(many_records, client_index=i, num_clients=3) for i in range(3)]
    assert sorted(r.text for p in parts for r in p) == sorted(r.text for r in many_records)
    users = [{r.user_id for r in p} for p in parts]
    assert all(users) and not (users[0] & users[1] or users[0] & users[2] or users[1] & users[2])
    assert client_partition(many_records, client_index=1, num_clients=3) == parts[1]


@pytest.mark.parametrize(
    "call, expected",
    [
        (lambda rs: split_heldout(rs, fraction=1.0), r"fraction must be in \[0, 1\)"),
        (lambda rs: split_heldout(rs, fraction=-0.1), r"fraction must be in \[0, 1\)"),
        (lambda rs: client_partition(rs, client_index=3, num_clients=3), r"client_index must be in \[0, 3\)"),
        (lambda rs: client_partition(rs, client_index=-1, num_clients=3), r"client_index must be in \[0, 3\)"),
        (lambda rs: client_partition(rs, client_index=0, num_clients=0), "num_clients must be >= 1"),
    ],
)
def test_partition_arguments_are_validated(many_records, call, expected):
    with pytest.raises(ValueError, match=expected):
        call(many_records)
