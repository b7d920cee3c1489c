"""Seeded synthetic personal records for each region: support tickets, chats and account profiles.

Texts are English so one tokenizer serves every region, but names, phones, addresses, national IDs,
dates and payment numbers follow each region's own formats, and each region has its own topics
(GDPR/SEPA in the EU, CCPA/sales tax in the US, PDPA/PayNow/HDB in Singapore, PIPL/Alipay in China).
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.util
import os
import random
import string
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from faker import Faker
from faker.config import AVAILABLE_LOCALES
from faker.providers.ssn.zh_CN import Provider as ChineseIdProvider

from common.data.corpus import ARRIVAL_ISSUES, CHANNELS, DELIVERY_STATUSES, FAULTS, PLANS, PRODUCTS
from common.data.records import Record, write_jsonl
from common.data.templates import COMMON_TEMPLATES as _COMMON_TEMPLATES
from common.errors import DataError

REGION_LOCALES = {
    "eu": ("de_DE", "fr_FR", "it_IT", "es_ES", "nl_NL"),
    "us": ("en_US",),
    "sg": ("en_SG",),
    "cn": ("zh_CN",),
}
SINGAPORE_LOCALE = "en_SG"  # Faker has no Singapore locale; this module builds Singapore PII itself.
# Slots whose values are personal data; a record's fields["pii"] lists the ones its text contains.
PII_SLOTS = ("name", "first_name", "email", "phone", "address", "national_id", "dob", "iban", "card", "order")
SPECIAL_CATEGORY_RATE = 0.05


@dataclass(frozen=True)
class _LocaleStyle:
    country: str
    date_format: str
    couriers: tuple[str, ...]
    tax: str
    union: str
    id_label: str


_LOCALE_STYLES = {
    "de_DE": _LocaleStyle("Germany", "%d.%m.%Y", ("DHL", "DPD", "Hermes"), "19% VAT", "ver.di", "Steuer-ID"),
    "fr_FR": _LocaleStyle(
        "France", "%d/%m/%Y", ("Colissimo", "Chronopost", "DPD"), "20% VAT", "CGT", "social security number (NIR)"
    ),
    "it_IT": _LocaleStyle("Italy", "%d/%m/%Y", ("Poste Italiane", "BRT", "GLS"), "22% VAT", "CGIL", "codice fiscale"),
    "es_ES": _LocaleStyle("Spain", "%d/%m/%Y", ("SEUR", "Correos", "MRW"), "21% VAT", "CCOO", "DNI"),
    "nl_NL": _LocaleStyle("the Netherlands", "%d-%m-%Y", ("PostNL", "DHL", "DPD"), "21% VAT", "FNV", "BSN"),
    "en_US": _LocaleStyle("the United States", "%m/%d/%Y", ("UPS", "USPS", "FedEx"), "sales tax", "Teamsters", "SSN"),
    "en_SG": _LocaleStyle("Singapore", "%d/%m/%Y", ("SingPost", "Ninja Van", "J&T Express"), "9% GST", "NTUC", "NRIC"),
    "zh_CN": _LocaleStyle(
        "China", "%Y-%m-%d", ("SF Express", "ZTO Express", "JD Logistics"), "13% VAT", "ACFTU", "resident ID"
    ),
}
_EU_COUNTRIES = (
    "Austria",
    "Belgium",
    "Croatia",
    "Germany",
    "France",
    "Greece",
    "Italy",
    "Portugal",
    "Spain",
    "the Netherlands",
    "Poland",
    "Sweden",
)
_TIERS = ("Bronze", "Silver", "Gold", "Platinum")
# Person slots that only some locales have (no national ID, no IBAN, no US state); templates needing them
# are skipped for people without them.
_OPTIONAL_PERSON_SLOTS = {"national_id", "iban", "state"}


_REGION_TEMPLATES = {
    "eu": (
        (
            "ticket",
            "Subject: GDPR access request (Article 15). I, {name}, ask for a copy of all personal data you "
            "hold about me, including my order history, call recordings and any profiling. My account email "
            "is {email}. Please reply within one month, as the GDPR requires.",
        ),
        (
            "ticket",
            "Under Article 17 of the GDPR I ask you to erase my account and all data linked to {email} and "
            "to my phone number {phone}. Keep only what tax law requires and confirm by email once it is "
            "done. {name}, {address}",
        ),
        (
            "ticket",
            "I returned the {product} from order {order} within the 14-day withdrawal period. Please send "
            "the refund of {amount} by SEPA transfer to IBAN {iban}, account holder {name}. The return was "
            "signed for by {courier} on {date}.",
        ),
        (
            "ticket",
            "The {product} I received has a UK plug instead of an EU plug, so it does not fit the sockets "
            "here in {country}. Order {order}, delivery address {address}. Please exchange it for the EU "
            "version, not an adapter.",
        ),
        (
            "chat",
            "Customer: my direct debit failed this month. Agent: I see the SEPA mandate was cancelled. Can "
            "you confirm your IBAN? Customer: {iban}. Agent: Thank you {first_name}, I have set up a new "
            "mandate and the {amount} will be collected on {date}.",
        ),
        (
            "ticket",
            "I was charged {amount} in roaming fees on my number {phone} while I was in {other_country} "
            "last week, although roaming inside the EU should cost the same as at home. Please refund it. "
            "Account holder {name}.",
        ),
        (
            "ticket",
            "I object to direct marketing and withdraw my consent for profiling under the GDPR. Please stop "
            "all newsletters to {email} and tell me which partners received my data. Name: {name}, date of "
            "birth {dob}.",
        ),
        (
            "ticket",
            "My parcel for order {order} was sent back to the {courier} depot although I was at home at "
            "{address} all day. Please redeliver it and send a tracking link by SMS to {phone}. {name}",
        ),
        (
            "chat",
            "Customer: I need a proper VAT invoice for order {order}, with my name {name} and address "
            "{address}. Agent: Of course. The invoice for {amount} including {tax} is now in your account. "
            "Customer: thanks, that is what I needed.",
        ),
        (
            "profile",
            "EU customer profile. Name: {name}. Country: {country}. {id_label}: {national_id}. IBAN for "
            "refunds: {iban}. Email: {email}. Phone: {phone}. GDPR marketing consent: {opt}. Data export "
            "last requested on {date}.",
        ),
    ),
    "us": (
        (
            "ticket",
            "I am a California resident and I want to opt out of the sale or sharing of my personal "
            "information under the CCPA (Do Not Sell or Share My Personal Information). Account email "
            "{email}, phone {phone}. Please also delete my browsing history. {name}",
        ),
        (
            "ticket",
            "Why was I charged {state} sales tax on order {order}? The tax was added to the {amount} total, "
            "but my ZIP code has a different rate. The shipping address is {address}. Please correct it. "
            "{first_name}",
        ),
        (
            "ticket",
            "Your store asked for my {id_label} ({national_id}) to run a credit check for the {plan} "
            "financing plan. I am not comfortable with that. Can you verify me another way? Name {name}, "
            "date of birth {dob}.",
        ),
        (
            "chat",
            "Customer: {courier} says my package was delivered but it is not on my porch. Agent: I'm sorry! "
            "Can you confirm the address? Customer: {address}. Agent: Thanks {first_name}, I have filed a "
            "missing package claim and a replacement {product} ships today.",
        ),
        (
            "ticket",
            "Please port my number {phone} from my old carrier to your {plan} plan. The account holder is "
            "{name}, born {dob}. I will give the transfer PIN over the phone, not in this form. Thanks.",
        ),
        (
            "ticket",
            "Price adjustment request: I bought a {product} on {date} for {amount} (order {order}) and it "
            "went on sale for Black Friday two days later. Please refund the difference to my card {card}. "
            "Thanks, {name}",
        ),
        (
            "ticket",
            "Under the CPRA I want to limit the use of my sensitive personal information. Please do not use "
            "my precise location or my {id_label} {national_id} for anything except the service. Account "
            "{email}, {name}.",
        ),
        (
            "chat",
            "Customer: I filed a chargeback with my bank for {amount} on card {card}. Agent: I see it, order "
            "{order} was never delivered, so we will not contest it. Customer: great. Agent: You will get an "
            "email at {email} when the case closes.",
        ),
        (
            "profile",
            "Customer profile (US). Name: {name}. Ship to: {address}. Phone: {phone}. Email: {email}. "
            "{id_label} on file for financing: {national_id}. DOB: {dob}. CCPA opt-out: {opt}. Loyalty "
            "tier: {tier}.",
        ),
    ),
    "sg": (
        (
            "ticket",
            "Under the PDPA I am requesting access to my personal data and information about how it was used "
            "or disclosed in the past year. My {id_label} is {national_id} and my email is {email}. Please "
            "reply within 30 days. {name}",
        ),
        (
            "ticket",
            "Why does your app ask for my full {id_label} ({national_id}) just to join the loyalty "
            "programme? Under the PDPC advisory guidelines you should not collect it. Please mask it in your "
            "records and confirm. {name}, {phone}",
        ),
        (
            "ticket",
            "Please refund {amount} for order {order} by PayNow to my mobile number {phone}, registered "
            "under {name}. The {product} arrived {issue}, and I already returned it at the POPStation near "
            "my block.",
        ),
        (
            "ticket",
            "Delivery for order {order} failed: the {courier} driver said the lift at my HDB block was under "
            "maintenance. Please redeliver to {address} on Saturday, I will meet the driver at the void "
            "deck. Contact {phone}.",
        ),
        (
            "chat",
            "Customer: my invoice for order {order} shows {tax} on {amount}. Can I claim a tourist refund? "
            "Agent: Sorry, the tourist refund scheme is only for visitors, and your account {email} has a "
            "local address. Customer: ok noted, thanks.",
        ),
        (
            "ticket",
            "I registered {phone} with the Do Not Call Registry but I still get telemarketing SMS about your "
            "{plan} promotions. Please stop immediately and remove my number from your lists. Account "
            "holder {name}, email {email}.",
        ),
        (
            "chat",
            "Customer: I want to sign up for the {plan} plan. Agent: Sure! For a new line we need your "
            "{id_label} and address for verification. Customer: {national_id}, {address}. Agent: Thank you "
            "{first_name}, your SIM will arrive in two working days.",
        ),
        (
            "ticket",
            "My NETS payment for order {order} went through twice and both {amount} charges appear on my "
            "card {card}. Please refund the duplicate. I live at {address} and can be reached at {phone}. "
            "{name}",
        ),
        (
            "profile",
            "Customer profile (SG). Name: {name}. {id_label}: {national_id}. Date of birth: {dob}. Address: "
            "{address}. Mobile: {phone}. Email: {email}. PayNow refunds: {opt}. PDPA marketing consent: "
            "{opt2}. Tier: {tier}.",
        ),
    ),
    "cn": (
        (
            "ticket",
            "Under the Personal Information Protection Law (PIPL) I request a copy of my personal "
            "information and a list of the third parties you shared it with. My {id_label} is "
            "{national_id} and my mobile number is {phone}. {name}",
        ),
        (
            "ticket",
            "Please confirm that my data is stored in mainland China and is not transferred abroad without "
            "my separate consent, as PIPL requires. My account is {email}, registered under {name}. Please "
            "reply in writing.",
        ),
        (
            "ticket",
            "Please refund {amount} for order {order} to the Alipay account linked to my mobile {phone}. "
            "The {product} arrived {issue}. If Alipay does not work, WeChat Pay is fine too. {name}",
        ),
        (
            "ticket",
            "Delivery note for {courier}: please leave the parcel for order {order} at the parcel locker or "
            "with the building guard at {address}. Do not call before 9 am. If there is a problem, message "
            "{phone} on WeChat.",
        ),
        (
            "chat",
            "Customer: please issue an electronic fapiao for order {order}. Agent: Sure, personal or company "
            "title? Customer: personal, name {name}. Agent: The fapiao for {amount} including {tax} has been "
            "sent to {email}.",
        ),
        (
            "ticket",
            "For the real-name registration of my new SIM on the {plan} plan I provide my details: name "
            "{name}, {id_label} {national_id}, address {address}. Please activate the number quickly, I "
            "need it for work.",
        ),
        (
            "chat",
            "Customer: the Double 11 discount was not applied to order {order}. Agent: Let me check. The "
            "coupon expired at midnight, but I can refund {amount} as a goodwill gesture to your WeChat Pay. "
            "Customer: ok, my WeChat is linked to {phone}.",
        ),
        (
            "ticket",
            "The {courier} courier called {phone} and said my {product} was in the smart locker, but the "
            "pickup code does not work. I live at {address}. Please send a new code or redeliver. {name}",
        ),
        (
            "profile",
            "Customer profile (CN). Name: {name}. {id_label}: {national_id}. Date of birth: {dob}. Mobile: "
            "{phone}. Email: {email}. Address: {address}. Payment card: {card}. PIPL separate consent for "
            "marketing: {opt}.",
        ),
    ),
}
_CURRENCIES = {"eu": "€", "us": "$", "sg": "S$", "cn": "¥"}

_SPECIAL_CATEGORIES = {
    "health": (
        "I have type 1 diabetes and my insulin cooler was in this parcel, so this is urgent.",
        "I am recovering from hip surgery and cannot carry heavy boxes up the stairs.",
        "I have multiple sclerosis, so please ask the courier to wait a little longer at the door.",
        "I am hard of hearing, so please contact me by email rather than by phone.",
        "I am having chemotherapy this month and missed the delivery while I was at the hospital.",
        "I am pregnant and was told not to lift anything heavy, so please bring it to the door.",
    ),
    "religion": (
        "I am Muslim and fasting this month, so please deliver after sunset.",
        "As an observant Jew I cannot accept deliveries on Saturday.",
        "I am a practising Catholic and at Mass on Sunday mornings, so please avoid that time.",
        "I am Hindu and the order was a gift for Deepavali, so it must arrive before the festival.",
        "I am Buddhist and will be at the temple for Vesak Day, so please deliver another day.",
    ),
    "trade_union": (
        "As a member of the {union} union I was promised the member discount, which was not applied.",
        "I am a {union} union representative and need the invoice for the union office.",
    ),
    "ethnicity": (
        "As a Roma family we have been refused delivery to our address before, please make sure it does not "
        "happen again.",
        "I am of Turkish descent and the courier made remarks about my name, which I want to report.",
        "I am ethnically Malay and your form keeps rejecting my name because of the word bin.",
    ),
    "political": (
        "I am a member of the Green Party and these are for our local election campaign.",
        "I volunteer for a political party and ordered this for our campaign office.",
    ),
}

# Singapore: HDB towns with their postal sector (first two postcode digits) and streets.
_SG_HDB_TOWNS = (
    ("56", ("Ang Mo Kio Ave 3", "Ang Mo Kio Ave 10", "Ang Mo Kio St 21")),
    ("46", ("Bedok North Ave 1", "Bedok Reservoir Rd", "New Upper Changi Rd")),
    ("52", ("Tampines St 21", "Tampines Ave 4", "Tampines St 81")),
    ("64", ("Jurong West St 41", "Jurong West St 91", "Boon Lay Dr")),
    ("73", ("Woodlands Dr 14", "Woodlands Ave 6", "Marsiling Rise")),
    ("76", ("Yishun Ring Rd", "Yishun Ave 11", "Yishun St 22")),
    ("31", ("Toa Payoh Lor 1", "Toa Payoh Lor 8", "Toa Payoh East")),
    ("82", ("Punggol Field", "Punggol Dr", "Edgefield Plains")),
    ("54", ("Sengkang East Way", "Compassvale Rd", "Rivervale Dr")),
    ("12", ("Clementi Ave 2", "Clementi West St 1", "West Coast Rd")),
    ("53", ("Hougang Ave 8", "Hougang St 91", "Upper Serangoon Rd")),
    ("65", ("Bukit Batok West Ave 6", "Bukit Batok St 31", "Bukit Batok East Ave 3")),
)
_SG_CONDO_STREETS = (
    ("26", "Bukit Timah Road"),
    ("27", "Holland Road"),
    ("24", "Orchard Boulevard"),
    ("08", "Tanjong Pagar Road"),
    ("42", "East Coast Road"),
    ("57", "Upper Thomson Road"),
)
_SG_CONDOS = ("Emerald Residences", "Seaview Heights", "Palm Court", "Orchid Suites", "Parkview Towers")
_SG_CHINESE_SURNAMES = (
    "Tan",
    "Lim",
    "Lee",
    "Ng",
    "Ong",
    "Wong",
    "Goh",
    "Chua",
    "Chan",
    "Koh",
    "Teo",
    "Ang",
    "Yeo",
    "Tay",
    "Ho",
    "Low",
    "Toh",
    "Sim",
    "Chong",
    "Chia",
    "Seah",
    "Foo",
    "Leong",
    "Lau",
)
_SG_CHINESE_GIVEN = (
    "Wei",
    "Jie",
    "Hui",
    "Min",
    "Xin",
    "Jun",
    "Kai",
    "Ling",
    "Mei",
    "Yi",
    "Zhi",
    "Hao",
    "Jia",
    "Shu",
    "Ying",
    "Kiat",
    "Boon",
    "Seng",
    "Hock",
    "Siew",
    "Li",
    "En",
    "Xuan",
    "Yong",
)
_SG_ENGLISH_NAMES = {
    "M": ("Jonathan", "Darren", "Gabriel", "Marcus", "Ryan", "Nicholas", "Benjamin"),
    "F": ("Rachel", "Michelle", "Cheryl", "Vanessa", "Joanne", "Charmaine", "Valerie"),
}
_SG_MALAY_GIVEN = {
    "M": ("Muhammad Faizal", "Ahmad Hafiz", "Mohamed Irfan", "Muhammad Danial", "Hairul Azman"),
    "F": ("Nur Aisyah", "Siti Nurhaliza", "Nurul Huda", "Farah Nadia", "Siti Khadijah"),
}
_SG_MALAY_FATHERS = ("Abdullah", "Rahman", "Ismail", "Osman", "Hassan", "Yusof", "Salleh", "Ibrahim")
_SG_INDIAN_GIVEN = {
    "M": ("Rajesh", "Arun", "Suresh", "Vikram", "Karthik", "Ganesh", "Prakash"),
    "F": ("Priya", "Kavitha", "Deepa", "Lakshmi", "Anitha", "Divya", "Meena"),
}
_SG_INDIAN_FATHERS = ("Kumar", "Subramaniam", "Ramasamy", "Krishnan", "Pillai", "Nair", "Raju", "Gopal")

# China: cities with their postcode prefix and districts, for English-format addresses.
_CN_CITIES = (
    ("Beijing", "100", ("Chaoyang", "Haidian", "Dongcheng", "Fengtai")),
    ("Shanghai", "200", ("Pudong New", "Xuhui", "Jing'an", "Minhang")),
    ("Guangzhou", "510", ("Tianhe", "Yuexiu", "Haizhu", "Baiyun")),
    ("Shenzhen", "518", ("Nanshan", "Futian", "Luohu", "Bao'an")),
    ("Chengdu", "610", ("Wuhou", "Jinjiang", "Qingyang", "Chenghua")),
    ("Hangzhou", "310", ("Xihu", "Shangcheng", "Binjiang", "Gongshu")),
    ("Wuhan", "430", ("Wuchang", "Jianghan", "Hongshan", "Qiaokou")),
    ("Nanjing", "210", ("Gulou", "Xuanwu", "Jianye", "Qinhuai")),
    ("Xi'an", "710", ("Yanta", "Beilin", "Lianhu", "Weiyang")),
    ("Chongqing", "400", ("Yuzhong", "Jiangbei", "Nan'an", "Shapingba")),
)
_CN_STREETS = (
    "Zhongshan",
    "Renmin",
    "Jiefang",
    "Huaihai",
    "Jianguo",
    "Heping",
    "Xinhua",
    "Changjiang",
    "Yan'an",
    "Wenhua",
    "Dongfeng",
    "Shengli",
    "Chunxi",
    "Binhai",
)
_CN_GIVEN_SYLLABLES = (
    "Wei",
    "Xiao",
    "Jia",
    "Zi",
    "Hao",
    "Yu",
    "Ming",
    "Hui",
    "Jun",
    "Lin",
    "Tian",
    "Xin",
    "Yi",
    "Chen",
    "Rui",
    "Ting",
    "Qing",
    "Li",
    "Yan",
    "Bo",
    "Fang",
    "Lei",
    "Na",
    "Tao",
)


def generate_region_records(
    region: str,
    locales: Sequence[str],
    *,
    seed: int,
    num_users: int,
    records_per_user: tuple[int, int] = (2, 6),
    consent_rate: float = 0.92,
) -> list[Record]:
    """Generate num_users synthetic users of a region, each with several records that reuse their PII."""
    lo, hi = records_per_user
    if num_users < 0 or not 1 <= lo <= hi:
        raise ValueError(
            f"need num_users >= 0 and 1 <= records_per_user[0] <= records_per_user[1], got "
            f"num_users={num_users}, records_per_user={records_per_user}; fix data.users_per_region or "
            f"data.records_per_user."
        )
    if not 0.0 <= consent_rate <= 1.0:
        raise ValueError(
            f"consent_rate must be in [0, 1], got {consent_rate}; set data.consent_rate to a share such as 0.92."
        )
    locales = tuple(locales) or REGION_LOCALES.get(region, ())
    if not locales:
        raise DataError(
            f"region {region!r} has no default locales; list Faker locales for it, e.g. "
            f"regions.{region}.locales=[en_GB]."
        )
    for locale in locales:
        if locale != SINGAPORE_LOCALE and locale not in AVAILABLE_LOCALES:
            raise DataError(
                f"region {region!r}: unknown Faker locale {locale!r}; see the valid ones with "
                f'`python -c "from faker.config import AVAILABLE_LOCALES; print(AVAILABLE_LOCALES)"` '
                f"(or use {SINGAPORE_LOCALE!r} for Singapore)."
            )

    rng = random.Random(_derive_seed(seed, region))
    fakers, styles = {}, {}
    for locale in locales:
        if locale != SINGAPORE_LOCALE:
            fakers[locale] = Faker(locale)
            fakers[locale].seed_instance(_derive_seed(seed, region, locale))
        styles[locale] = _locale_style(locale, fakers.get(locale))
    templates = _COMMON_TEMPLATES + _REGION_TEMPLATES.get(region, ())
    currency = _CURRENCIES.get(region, "$")

    records = []
    for index in range(num_users):
        user_id = f"{region}-u{index:05d}"
        locale = rng.choice(locales)
        person = _make_person(locale, fakers.get(locale), styles[locale], rng)
        consent = rng.random() < consent_rate
        usable = [t for t in templates if _slots_of(t[1]) & _OPTIONAL_PERSON_SLOTS <= person.keys()]
        count = rng.randint(lo, hi)
        # Distinct templates per user where possible, so one person never files the same text twice.
        picks = rng.sample(usable, count) if count <= len(usable) else [rng.choice(usable) for _ in range(count)]
        for k, template in enumerate(picks):
            records.append(
                _make_record(region, user_id, k, consent, locale, styles[locale], person, template, currency, rng)
            )
    return records


def write_region_dataset(
    region: str,
    locales: Sequence[str],
    out_dir: str | os.PathLike,
    *,
    seed: int,
    num_users: int,
    records_per_user: tuple[int, int] = (2, 6),
    consent_rate: float = 0.92,
    num_shards: int = 2,
) -> list[Path]:
    """Write a region's records as out_dir/part-NNNNN.jsonl shards (users never split) and return the paths."""
    if not 1 <= num_shards <= num_users:
        raise ValueError(
            f"num_shards must be between 1 and num_users ({num_users}) so no shard is empty, got "
            f"{num_shards}; lower data.shards or raise users_per_region."
        )
    records = generate_region_records(
        region, locales, seed=seed, num_users=num_users, records_per_user=records_per_user, consent_rate=consent_rate
    )
    users = list(dict.fromkeys(r.user_id for r in records))
    # Contiguous blocks of users per shard, so one person's records never span two files.
    shard_of = {u: i * num_shards // len(users) for i, u in enumerate(users)}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Remove stale shards too, so a re-run with fewer shards leaves no records from the old run.
    for old in out_dir.glob("part-*.jsonl"):
        old.unlink()
    paths = []
    for shard in range(num_shards):
        path = out_dir / f"part-{shard:05d}.jsonl"
        write_jsonl((r for r in records if shard_of[r.user_id] == shard), path)
        paths.append(path)
    return paths


def _derive_seed(*parts: object) -> int:
    # sha256, not hash(): Python salts str hashes per process, which would break reproducibility.
    return int.from_bytes(hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()[:8], "big")


def _make_record(
    region: str,
    user_id: str,
    k: int,
    consent: bool,
    locale: str,
    style: _LocaleStyle,
    person: dict[str, str],
    template: tuple[str, str],
    currency: str,
    rng: random.Random,
) -> Record:
    created = datetime.date(2023, 1, 1) + datetime.timedelta(days=rng.randint(0, 900))
    slots = dict(person)
    slots.update(
        order=f"{region.upper()}-{rng.randint(10_000_000, 99_999_999)}",
        product=rng.choice(PRODUCTS),
        issue=rng.choice(ARRIVAL_ISSUES),
        fault=rng.choice(FAULTS),
        plan=rng.choice(PLANS),
        status=rng.choice(DELIVERY_STATUSES),
        channel=rng.choice(CHANNELS),
        courier=rng.choice(style.couriers),
        tier=rng.choice(_TIERS),
        tax=style.tax,
        country=style.country,
        other_country=rng.choice([c for c in _EU_COUNTRIES if c != style.country]),
        amount=f"{currency}{rng.randint(500, 90_000) / 100:,.2f}",
        days=str(rng.randint(5, 40)),
        date=(created - datetime.timedelta(days=rng.randint(1, 20))).strftime(style.date_format),
        opt=rng.choice(("yes", "no")),
        opt2=rng.choice(("allowed", "not allowed")),
    )
    kind, text_template = template
    text = text_template.format(**slots)
    tags = []
    if rng.random() < SPECIAL_CATEGORY_RATE:
        category = rng.choice(sorted(_SPECIAL_CATEGORIES))
        sentence = rng.choice(_SPECIAL_CATEGORIES[category]).format(union=style.union)
        text += f" Customer: {sentence}" if kind == "chat" else f" {sentence}"
        tags.append(f"special:{category}")
    used = _slots_of(text_template)
    fields = {
        "record_id": f"{user_id}-r{k}",
        "locale": locale,
        "kind": kind,
        "created_at": created.isoformat(),
        "tags": tags,
        "pii": {s: slots[s] for s in PII_SLOTS if s in used},
    }
    return Record(text=text, region=region, user_id=user_id, consent=consent, fields=fields)


def _slots_of(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


def _locale_style(locale: str, fake: Faker | None) -> _LocaleStyle:
    if locale in _LOCALE_STYLES:
        return _LOCALE_STYLES[locale]
    assert fake is not None, f"no Faker for locale {locale}"  # every locale without a preset style has one
    try:
        country = fake.current_country()
    except ValueError:  # Faker cannot name the country of some language-only locales
        country = locale
    return _LocaleStyle(
        country, "%Y-%m-%d", ("DHL", "UPS", "the national post"), "VAT", "trade union", "national ID number"
    )


def _make_person(locale: str, fake: Faker | None, style: _LocaleStyle, rng: random.Random) -> dict[str, str]:
    """One user's identity, reused across all their records; keys are template slots."""
    gender = rng.choice("FM")
    dob = datetime.date(1950, 1, 1) + datetime.timedelta(days=rng.randint(0, 20_000))
    if locale == SINGAPORE_LOCALE:
        person = _singapore_person(rng, gender, dob)
    else:
        assert fake is not None, f"no Faker for locale {locale}"  # only Singapore's identities are fedsov's own
        if locale == "zh_CN":
            person = _chinese_person(fake, rng, gender, dob)
        else:
            person = _faker_person(locale, fake, rng, gender)
    person.setdefault("id_label", style.id_label)
    person["dob"] = dob.strftime(style.date_format)
    person["card"] = _card_number("62" if locale == "zh_CN" else rng.choice(("4", "51", "53", "55")), rng)
    return person


def _faker_person(locale: str, fake: Faker, rng: random.Random, gender: str) -> dict[str, str]:
    first = fake.first_name_female() if gender == "F" else fake.first_name_male()
    last = fake.last_name()
    person = {
        "name": f"{first} {last}",
        "first_name": first,
        "phone": fake.phone_number(),
        "email": _email(first, last, locale, rng) or fake.email(safe=True),
    }
    if locale == "en_US":
        state = fake.state_abbr(include_territories=False, include_freely_associated_states=False)
        person["address"] = f"{fake.street_address()}, {fake.city()}, {state} {fake.zipcode_in_state(state)}"
        person["state"] = state
        person["phone"] = f"({rng.randint(201, 989)}) {rng.randint(200, 999)}-{rng.randint(0, 9999):04d}"
    else:
        person["address"] = fake.address().replace("\n", ", ")
    if locale == "de_DE":
        person["national_id"] = steuer_id(rng)
    elif locale == "es_ES":
        person["national_id"] = fake.nif()
    elif locale in _LOCALE_STYLES or importlib.util.find_spec(f"faker.providers.ssn.{locale}"):
        # Some locales' ssn() (e.g. pl_PL, sv_SE) encode a birth date drawn relative to today, so their
        # output is reproducible only within a day; the built-in regions avoid those.
        person["national_id"] = fake.ssn()
    iban = fake.iban()
    # Only where IBAN is the locale's own account format (Faker falls back to GB elsewhere).
    if iban[:2] == locale[-2:]:
        person["iban"] = iban
    return person


def _singapore_person(rng: random.Random, gender: str, dob: datetime.date) -> dict[str, str]:
    roll = rng.random()
    if roll < 0.7:
        surname = rng.choice(_SG_CHINESE_SURNAMES)
        given = " ".join(rng.sample(_SG_CHINESE_GIVEN, 2))
        english = rng.choice(_SG_ENGLISH_NAMES[gender]) if rng.random() < 0.35 else ""
        name = f"{english} {surname} {given}".strip()
        first, last = english or given, surname
    elif roll < 0.85:
        first, last = rng.choice(_SG_MALAY_GIVEN[gender]), rng.choice(_SG_MALAY_FATHERS)
        name = f"{first} {'bin' if gender == 'M' else 'binte'} {last}"
    else:
        first, last = rng.choice(_SG_INDIAN_GIVEN[gender]), rng.choice(_SG_INDIAN_FATHERS)
        name = f"{first} {'s/o' if gender == 'M' else 'd/o'} {last}"
    citizen = rng.random() < 0.85
    prefix = ("S" if dob.year < 2000 else "T") if citizen else ("F" if dob.year < 2000 else "G")
    # Citizens' NRIC digits start with the birth year for those born from 1968 on.
    digits = (
        f"{dob.year % 100:02d}{rng.randint(0, 99_999):05d}"
        if citizen and dob.year >= 1968
        else f"{rng.randint(0, 9_999_999):07d}"
    )
    if rng.random() < 0.8:
        sector, streets = rng.choice(_SG_HDB_TOWNS)
        block = rng.randint(100, 899)
        address = (
            f"Blk {block} {rng.choice(streets)}, #{rng.randint(2, 25):02d}-{rng.randint(1, 350):02d}, "
            f"Singapore {sector}{block:04d}"
        )
    else:
        sector, street = rng.choice(_SG_CONDO_STREETS)
        address = (
            f"{rng.randint(1, 450)} {street}, #{rng.randint(2, 30):02d}-{rng.randint(1, 12):02d}, "
            f"{rng.choice(_SG_CONDOS)}, Singapore {sector}{rng.randint(0, 9999):04d}"
        )
    return {
        "name": name,
        "first_name": first,
        "email": _email(first, last, SINGAPORE_LOCALE, rng),
        "address": address,
        "phone": f"+65 {rng.choice('89')}{rng.randint(0, 999):03d} {rng.randint(0, 9999):04d}",
        "national_id": prefix + digits + nric_check_letter(prefix, digits),
        "id_label": "NRIC" if citizen else "FIN",
    }


def _chinese_person(fake: Faker, rng: random.Random, gender: str, dob: datetime.date) -> dict[str, str]:
    surname = fake.last_romanized_name()
    given = "".join(rng.sample(_CN_GIVEN_SYLLABLES, rng.randint(1, 2))).capitalize()
    city, postcode, districts = rng.choice(_CN_CITIES)
    address = (
        f"Room {rng.randint(1, 32)}{rng.randint(1, 8):02d}, Building {rng.randint(1, 20)}, "
        f"No. {rng.randint(1, 999)} {rng.choice(_CN_STREETS)} Road, {rng.choice(districts)} District, "
        f"{city} {postcode}{rng.randint(0, 999):03d}"
    )
    # Faker's zh_CN ssn() draws the birth date relative to today, which breaks reproducibility; build the
    # ID from Faker's area codes and this person's birth date instead. The 17th digit is odd for men.
    sequence = f"{rng.randint(0, 99):02d}{rng.choice('13579' if gender == 'M' else '02468')}"
    body = rng.choice(ChineseIdProvider.area_codes) + dob.strftime("%Y%m%d") + sequence
    return {
        "name": f"{surname} {given}",
        "first_name": given,
        "email": _email(given, surname, "zh_CN", rng),
        "address": address,
        "phone": fake.phone_number(),
        "national_id": body + china_id_check_char(body),
    }


def _email(first: str, last: str, locale: str, rng: random.Random) -> str:
    first, last = _ascii_word(first), _ascii_word(last)
    if not first or not last:
        return ""
    local = rng.choice(
        (
            f"{first}.{last}",
            f"{first[0]}{last}",
            f"{first}{last}{rng.randint(1, 99)}",
            f"{last}.{first}",
            f"{first}_{last}{rng.randint(70, 99)}",
        )
    )
    domain = rng.choice(("example.com", "example.net", "example.org", f"mail.example.{locale[-2:].lower()}"))
    return f"{local}@{domain}"


def _ascii_word(name: str) -> str:
    folded = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode().lower()
    return "".join(c for c in folded if c.isalnum())


def _card_number(prefix: str, rng: random.Random) -> str:
    payload = prefix + "".join(str(rng.randint(0, 9)) for _ in range(15 - len(prefix)))
    digits = payload + luhn_check_digit(payload)
    return " ".join(digits[i : i + 4] for i in range(0, 16, 4))


def luhn_check_digit(payload: str) -> str:
    """The digit that makes payload + digit pass the Luhn check (payment card numbers)."""
    total = 0
    for i, ch in enumerate(reversed(payload)):
        d = int(ch) * (2 if i % 2 == 0 else 1)
        total += d - 9 if d > 9 else d
    return str(-total % 10)


def nric_check_letter(prefix: str, digits: str) -> str:
    """Singapore NRIC/FIN check letter for prefix S, T, F or G and seven digits."""
    total = sum(int(d) * w for d, w in zip(digits, (2, 7, 6, 5, 4, 3, 2), strict=True))
    total += 4 if prefix in "TG" else 0
    return ("JZIHGFEDCBA" if prefix in "ST" else "XWUTRQPNMLK")[total % 11]


def china_id_check_char(body: str) -> str:
    """ISO 7064 MOD 11-2 check character of a 17-digit Chinese resident ID body."""
    total = sum(int(d) * (2 ** (17 - i) % 11) for i, d in enumerate(body))
    return "10X98765432"[total % 11]


def steuer_id(rng: random.Random) -> str:
    """A German tax ID: 11 digits, one digit repeated in the first ten, ISO 7064 MOD 11,10 check digit."""
    digits = rng.sample(range(10), 9)
    digits.insert(rng.randint(0, 9), rng.choice(digits))
    while digits[0] == 0:
        rng.shuffle(digits)
    product = 10
    for d in digits:
        s = (d + product) % 10 or 10
        product = s * 2 % 11
    return "".join(map(str, digits)) + str((11 - product) % 10)
