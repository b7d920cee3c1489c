"""A PII-free public corpus of retail and telecom support text, used to pre-train the tiny base model.

The documents share the regional records' genre and vocabulary (products, deliveries, refunds, billing,
privacy requests) but contain no names, contact details, addresses, ID, card or account numbers:
placeholders like "the order number on your receipt" stand where personal data would be.
"""

from __future__ import annotations

import hashlib
import random

from common.data.templates import COMMON_TEMPLATES

# Vocabulary shared with the synthetic regional records (common/data/synthetic.py).
PRODUCTS = (
    "pair of wireless earbuds",
    "phone case",
    "USB-C charger",
    "smartwatch",
    "laptop stand",
    "coffee machine",
    "air fryer",
    "robot vacuum",
    "electric kettle",
    "pair of running shoes",
    "winter jacket",
    "yoga mat",
    "desk lamp",
    "mechanical keyboard",
    "gaming mouse",
    "4K monitor",
    "tablet",
    "e-reader",
    "bluetooth speaker",
    "pair of noise-cancelling headphones",
    "baby stroller",
    "child car seat",
    "office chair",
    "blender",
    "toaster",
    "hair dryer",
    "electric toothbrush",
    "hiking backpack",
    "carry-on suitcase",
    "set of bed sheets",
    "water filter jug",
    "Wi-Fi router",
    "mesh Wi-Fi kit",
    "smartphone",
    "power bank",
    "camera tripod",
    "action camera",
    "printer ink cartridge",
    "board game",
    "kitchen scale",
    "standing desk",
    "rice cooker",
    "microwave oven",
    "electric scooter",
    "fitness tracker",
)
ARRIVAL_ISSUES = (
    "with a cracked screen",
    "with missing parts",
    "in the wrong colour",
    "in the wrong size",
    "in a crushed box",
    "without the charger",
    "already opened",
    "completely dead",
    "with a broken hinge",
    "two weeks late",
    "with deep scratches on the front",
    "with the manual in the wrong language",
    "with a leaking seal",
    "with a faulty battery",
    "with a bent frame",
    "soaking wet from the rain",
)
FAULTS = (
    "stopped charging",
    "keeps restarting",
    "will not turn on",
    "makes a loud buzzing noise",
    "overheats after a few minutes",
    "keeps losing its Bluetooth connection",
    "has a flickering display",
    "drains the battery overnight",
    "stopped connecting to Wi-Fi",
    "started leaking water",
    "shows an error light",
    "smells of burning plastic",
)
PLANS = (
    "Basic 10GB",
    "Unlimited Plus",
    "Family Share",
    "5G Max",
    "Prepaid Flex",
    "Fibre 500",
    "Home Broadband 1Gb",
    "Student Saver",
    "Travel Roamer",
)
DELIVERY_STATUSES = (
    "in transit",
    "out for delivery",
    "awaiting pickup",
    "held at the depot",
    "delivery attempted",
    "label created",
    "returned to sender",
    "in customs clearance",
)
CHANNELS = ("email", "SMS", "phone", "app notifications", "post")

_WHEN = (
    "last week",
    "a few days ago",
    "on Monday",
    "last month",
    "over the weekend",
    "yesterday",
    "during the sale",
    "two weeks ago",
)
_AMOUNTS = ("the full amount", "the delivery fee", "the price difference", "the deposit", "the extra charge")

_TICKET_GREETINGS = (
    "Hello,",
    "Hi there,",
    "Dear support team,",
    "Good morning,",
    "Hi,",
    "To whom it may concern,",
    "Hello again,",
)
_TICKET_PROBLEMS = (
    "I ordered a {product} {when} and it arrived {issue}.",
    "My {product} {fault} after only {n} days of use.",
    "I was charged twice for the same order {when} and only one parcel arrived.",
    "The parcel with my {product} has shown {status} for {n} days now.",
    "I returned a {product} {when} but the refund has still not reached my account.",
    "My {plan} plan was renewed although I asked to cancel it before the end of the contract.",
    "The courier marked my parcel as delivered but nothing was left at my door or with the neighbours.",
    "I can no longer sign in to my account since the latest app update.",
    "My monthly bill is higher than usual and I do not understand the roaming charges on it.",
    "I would like to know what personal data you keep about me, who you share it with and why.",
    "I asked you to delete my account {when} and I am still receiving marketing emails.",
    "The {product} I bought {when} is now cheaper on your website and I would like the price difference.",
    "My mobile data stopped working {when} even though my {plan} allowance is not used up.",
    "The voucher code from your newsletter was rejected at checkout for a {product}.",
)
_TICKET_DETAILS = (
    "The order number is on my receipt.",
    "I have attached photos of the damage to this message.",
    "I already tried restarting it and resetting it to factory settings.",
    "This is the second time this has happened in a month.",
    "I contacted the live chat yesterday but nobody replied.",
    "My delivery address and contact details on the account are correct.",
    "The box was still sealed when I opened it, so it must have happened at the warehouse.",
    "I paid with the card saved in my account.",
    "The tracking page has not been updated since.",
    "I need it urgently because it was meant to be a gift.",
)
_TICKET_REQUESTS = (
    "Could you please send a replacement as soon as possible?",
    "Please refund {amount} to my original payment method.",
    "Please let me know how to return it and whether the return shipping is free.",
    "Can someone call me back on the number registered on my account?",
    "Please escalate this to a supervisor, I have waited long enough.",
    "Please delete my account and all the personal data linked to it, and confirm in writing.",
    "Please correct the bill and confirm the change to my registered email address.",
    "Please send me a copy of all the data you hold about me within the legal deadline.",
    "Please cancel the contract at the end of this billing period.",
)
_SIGNOFFS = (
    "Thanks.",
    "Kind regards.",
    "Best wishes.",
    "Thank you in advance.",
    "Regards.",
    "Many thanks for your help.",
)

_REPLY_OPENINGS = (
    "Thank you for contacting customer support.",
    "Thanks for getting in touch with us.",
    "Thank you for your message and for your patience.",
    "Hello, and thanks for reaching out.",
)
_REPLY_APOLOGIES = (
    "We are sorry that your {product} arrived {issue}.",
    "We are sorry to hear that your {product} {fault}.",
    "We apologise for the delay with your parcel, which is currently {status}.",
    "We understand how frustrating an unexpected charge on your bill can be.",
    "We have received your request about the personal data we hold on your account.",
    "We are sorry that your {plan} plan did not work as expected.",
)
_REPLY_ACTIONS = (
    "We have issued a refund of {amount} to your original payment method.",
    "A replacement {product} has been dispatched and you will receive a tracking link by {channel}.",
    "We have opened an investigation with the courier and will update you within {n} working days.",
    "A prepaid return label has been sent to your registered email address.",
    "Your request has been passed to our data protection team, who will reply within the legal deadline.",
    "We have removed the extra charge and the corrected bill will appear in your account.",
    "Your account has been closed and your personal data will be deleted except where the law requires us to keep it.",
    "We have reset your network settings remotely, so please restart your phone.",
)
_REPLY_TIMELINES = (
    "Refunds usually appear within {n} working days, depending on your bank.",
    "Please allow up to {n} days for the changes to take effect.",
    "If you do not hear from us within {n} days, simply reply to this message.",
    "You can follow the progress at any time in the Orders section of the app.",
)
_REPLY_CLOSINGS = (
    "Kind regards, the customer care team.",
    "Best regards, customer support.",
    "We hope this helps. Have a nice day.",
    "Thank you for shopping with us.",
)

_FAQ = (
    "Q: How do I request a copy of my personal data? A: Sign in, open Privacy settings and choose Download my "
    "data. We prepare a file with your orders, contact details and preferences and send a link to your registered "
    "email address within {n} days.",
    "Q: How do I delete my account? A: Open Privacy settings and choose Delete account. We confirm the request "
    "by {channel}. Some records, such as invoices, must be kept for tax purposes and are deleted when the legal "
    "retention period ends.",
    "Q: When will I get my refund? A: Once the returned item reaches our warehouse we check it and refund "
    "{amount} to the original payment method. Most banks show the refund within {n} working days.",
    "Q: My parcel shows {status}. What should I do? A: Tracking can pause for a few days. If there is no update "
    "after {n} days, contact us with the order number on your receipt and we will open a case with the courier.",
    "Q: Can I change my delivery address after ordering? A: Yes, until the parcel is dispatched. Go to Orders, "
    "select the order and choose Change address. After dispatch, ask the courier to redirect the parcel.",
    "Q: How do I stop marketing messages? A: Open Communication preferences and switch off {channel}. You can also "
    "use the unsubscribe link at the bottom of any newsletter. Service messages about your orders will continue.",
    "Q: Why is my bill higher this month? A: Common reasons are roaming, calls to premium numbers and data used "
    "beyond your {plan} allowance. The itemised bill in the app lists every extra charge.",
    "Q: What if my {product} is faulty? A: Items are covered by the legal guarantee. Report the fault within the "
    "warranty period and we will repair, replace or refund it. Keep the receipt or the order confirmation.",
    "Q: How do I switch to the {plan} plan? A: Choose Change plan in the app. The new plan starts at the next "
    "billing date and there is no fee for switching.",
    "Q: Who can see my data? A: Only staff who need it to handle your orders and our contracted couriers and "
    "payment providers. We never sell customer data. You can object to profiling in Privacy settings.",
    "Q: How do I return an item? A: Start a return in Orders within the return window, print the prepaid label "
    "and drop the parcel at any collection point. You will receive {amount} back once we receive it.",
    "Q: My SIM card is not working. What can I do? A: Restart the phone, check that mobile data is on and that "
    "the {plan} plan is active. If it still fails, request a free replacement SIM in the app.",
)
_FAQ_TAILS = (
    "",
    " Still need help? Contact us through the app.",
    " More answers are in the Help Centre.",
    " Our chat team is available every day.",
)

_CHAT_OPENERS = (
    "hi, my parcel with the {product} has not arrived yet",
    "hello, my {product} {fault}",
    "hi, I was charged for something I did not order",
    "hey, my {plan} plan stopped working {when}",
    "hi, I want to know what data you have about me",
    "hello, I want to return a {product} that arrived {issue}",
    "hi, I need to change the delivery address on my order",
)
_CHAT_VERIFY = (
    "Sorry about that! Could you confirm the order number on your receipt?",
    "I can help with that. For security, please confirm the email address registered on your account.",
    "Happy to help. Can you confirm the last few digits of the payment card, without sending the full number?",
    "Thanks for waiting. Please verify your identity using the secure link I have just sent by {channel}.",
)
_CHAT_CONFIRMS = ("ok, done", "sure, I just sent it", "done, it is in the form now", "yes, I verified it in the app")
_CHAT_ACTIONS = (
    "Thanks! I have escalated this with the courier, the parcel is {status}.",
    "Thank you. I have issued a refund of {amount}, it takes about {n} working days.",
    "Thank you. A replacement {product} will be sent today.",
    "Thanks. I have forwarded your request to our privacy team, they reply within the legal deadline.",
    "Thanks. I have updated the address, the courier will use the new one.",
)
_CHAT_ENDINGS = ("great, thanks", "thank you so much", "ok, thanks for the quick help", "perfect, have a nice day")

_NOTICES = (
    "Important notice about your account: we have updated our privacy policy to explain more clearly how we use "
    "your data for deliveries and fraud prevention. No action is needed. You can review your choices in Privacy "
    "settings at any time.",
    "Your {plan} plan will renew automatically in {n} days. If you want to change or cancel it, do so before the "
    "renewal date in the app. Your registered payment method will be charged.",
    "We noticed a sign-in to your account from a new device. If this was you, no action is needed. If not, reset "
    "your password now and contact customer support through the app.",
    "Your return has been received at our warehouse. We are checking the {product} and will refund {amount} to "
    "your original payment method within {n} working days.",
    "Good news: your {product} has been dispatched and is now {status}. You will receive updates by {channel}. "
    "Please make sure someone can receive the parcel at your delivery address.",
    "Reminder: your bill is ready. You can view the itemised bill, including any roaming or extra data charges, "
    "in the app. Payment will be collected in {n} days using your saved payment method.",
    "As requested, we have stopped sending you marketing messages by {channel}. You will still receive service "
    "messages about your orders, deliveries and bills.",
    "Scheduled maintenance: mobile data and the app may be unavailable for up to {n} hours tonight while we "
    "upgrade our network. We apologise for any inconvenience.",
)
_NOTICE_TAILS = (
    "This is an automated message, so please do not reply to it. For help, open the Help Centre in the app.",
    "You are receiving this service message because you have an active account with us.",
    "To manage which messages you receive, open Communication preferences in your account settings.",
    "Thank you for being a customer. If you have questions, our support team is available every day.",
)


# Numbers, codes and place names that belong to the shop, not to a person: they teach the
# base model what digits, dates, prices and addresses look like, so personal data in the
# regional records is surprising in content but not in form.
_CITIES = (
    "Berlin",
    "Munich",
    "Hamburg",
    "Paris",
    "Lyon",
    "Madrid",
    "Barcelona",
    "Milan",
    "Rome",
    "Amsterdam",
    "Rotterdam",
    "New York",
    "Chicago",
    "Austin",
    "Seattle",
    "Los Angeles",
    "Singapore",
    "Jurong",
    "Tampines",
    "Shanghai",
    "Beijing",
    "Shenzhen",
    "Guangzhou",
    "Hangzhou",
    "Vienna",
    "Brussels",
    "Dublin",
    "Lisbon",
)
_STREETS = (
    "Market Street",
    "Hauptstrasse",
    "Rue de la Gare",
    "Via Roma",
    "Calle Mayor",
    "Orchard Road",
    "Nanjing Road",
    "Main Street",
    "Station Square",
    "Harbour Drive",
    "Kalverstraat",
    "Broadway",
)
_CURRENCIES = ("EUR", "USD", "SGD", "CNY", "€", "$", "S$", "¥")
_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)
_HOTLINES = (
    "+49 30 {d4} {d4}",
    "+33 1 {d2} {d2} {d2} {d2}",
    "+1 (800) {d3}-{d4}",
    "+65 6{d3} {d4}",
    "+86 400 {d3} {d4}",
    "+39 02 {d4} {d4}",
    "+34 91 {d3} {d2} {d2}",
    "+31 20 {d3} {d4}",
)


def _digits(rng: random.Random, n: int) -> str:
    return "".join(str(rng.randint(0, 9)) for _ in range(n))


def _hotline(rng: random.Random) -> str:
    pattern = rng.choice(_HOTLINES)
    while "{d" in pattern:  # fresh digits for every placeholder
        i = pattern.index("{d")
        pattern = pattern[:i] + _digits(rng, int(pattern[i + 2])) + pattern[i + 4 :]
    return pattern


def _price(rng: random.Random) -> str:
    return f"{rng.choice(_CURRENCIES)}{rng.randint(5, 1999)}.{_digits(rng, 2)}"


def _date(rng: random.Random) -> str:
    day, month, year = rng.randint(1, 28), rng.randint(1, 12), rng.randint(2019, 2025)
    return rng.choice(
        (
            f"{day:02d}.{month:02d}.{year}",
            f"{month:02d}/{day:02d}/{year}",
            f"{year}-{month:02d}-{day:02d}",
            f"{day} {_MONTHS[month - 1]} {year}",
            f"{day:02d}/{month:02d}/{year}",
        )
    )


def _shop_facts(rng: random.Random) -> str:
    facts = (
        f"Our store at {rng.randint(1, 240)} {rng.choice(_STREETS)}, {rng.choice(_CITIES)} {_digits(rng, 5)} is open "
        f"{rng.choice(_WEEKDAYS)} to {rng.choice(_WEEKDAYS)} from {rng.randint(7, 10)}:00 to "
        f"{rng.randint(17, 22)}:{rng.choice(('00', '30'))}.",
        f"Order {rng.choice(('EU', 'US', 'SG', 'CN', 'WEB'))}-{_digits(rng, 8)} was shipped on {_date(rng)} "
        f"with tracking number {rng.choice(('JD', 'DHL', '1Z', 'SF', 'PX'))}{_digits(rng, 10)}.",
        f"The {rng.choice(PRODUCTS)} (item {rng.choice('ABCDEFGHK')}{rng.choice('LMNPRSTX')}-{_digits(rng, 4)}) costs "
        f"{_price(rng)} and is in stock in {rng.randint(2, 60)} stores.",
        f"For help call our hotline {_hotline(rng)} between {rng.randint(8, 10)}:00 and {rng.randint(17, 20)}:00 "
        f"or write to support@{rng.choice(('shop', 'help', 'care'))}.example.com.",
        f"Invoice {_digits(rng, 6)} of {_date(rng)}: {rng.randint(1, 4)} x {rng.choice(PRODUCTS)}, total {_price(rng)} "
        f"including {rng.choice((7, 8, 9, 10, 13, 19, 20, 21, 22))}% tax.",
        f"Parcel locker {rng.randint(10, 999)} at {rng.choice(_CITIES)} "
        f"{rng.choice(('Central Station', 'Airport', 'Mall', 'Harbour'))} "
        f"holds parcels for {rng.randint(3, 10)} days; the pickup code is sent by {rng.choice(CHANNELS)}.",
    )
    return " ".join(rng.sample(facts, rng.randint(3, 5)))


# Where a record would hold personal data, public text holds a placeholder, as in redacted
# support logs published for training.
_PLACEHOLDERS = {
    "name": ("the account holder", "the customer", "[name removed]", "the registered customer"),
    "first_name": ("the customer", "[name removed]", "Customer Care"),
    "email": ("the email address on file", "[email removed]", "the registered email address"),
    "phone": ("the number on the account", "[phone removed]", "the registered mobile number"),
    "address": ("the address on file", "[address removed]", "the delivery address on the account"),
    "dob": ("the date of birth on file", "[date of birth removed]"),
    "national_id": ("[ID number removed]", "the ID number on file"),
    "card": ("the saved card", "[card removed]", "the card on file"),
    "id_label": ("national ID", "ID card", "passport"),
}
_COURIERS = ("the courier", "the delivery partner", "DHL", "UPS", "FedEx", "the postal service")


def _redacted_record(rng: random.Random) -> str:
    _, template = rng.choice(COMMON_TEMPLATES)
    slots = {slot: rng.choice(values) for slot, values in _PLACEHOLDERS.items()}
    slots.update(
        order=f"WEB-{_digits(rng, 8)}",
        date=_date(rng),
        amount=_price(rng),
        days=str(rng.randint(5, 40)),
        courier=rng.choice(_COURIERS),
        tier=rng.choice(("Bronze", "Silver", "Gold", "Platinum")),
        tax=f"{rng.choice((7, 9, 13, 19, 20, 21))}% tax",
        opt=rng.choice(("yes", "no")),
        opt2=rng.choice(("allowed", "not allowed")),
        product=rng.choice(PRODUCTS),
        issue=rng.choice(ARRIVAL_ISSUES),
        fault=rng.choice(FAULTS),
        plan=rng.choice(PLANS),
        status=rng.choice(DELIVERY_STATUSES),
        channel=rng.choice(CHANNELS),
    )
    return template.format(**slots)


def generate_public_corpus(*, seed: int, num_documents: int) -> list[str]:
    """Return num_documents PII-free support documents (tickets, replies, FAQs, chats, notices), seeded."""
    if num_documents < 0:
        raise ValueError(f"num_documents must be >= 0, got {num_documents}; pass how many documents to generate.")
    rng = random.Random(int.from_bytes(hashlib.sha256(f"public-corpus:{seed}".encode()).digest()[:8], "big"))
    builders = (_ticket, _reply, _faq, _chat, _notice, _shop_facts, _redacted_record, _redacted_record)
    return [_fill(doc, rng) if "{" in doc else doc for doc in (rng.choice(builders)(rng) for _ in range(num_documents))]


def _ticket(rng: random.Random) -> str:
    parts = [rng.choice(_TICKET_GREETINGS), rng.choice(_TICKET_PROBLEMS)]
    parts += rng.sample(_TICKET_DETAILS, rng.randint(1, 2))
    parts += [rng.choice(_TICKET_REQUESTS), rng.choice(_SIGNOFFS)]
    return " ".join(parts)


def _reply(rng: random.Random) -> str:
    return " ".join(
        rng.choice(p) for p in (_REPLY_OPENINGS, _REPLY_APOLOGIES, _REPLY_ACTIONS, _REPLY_TIMELINES, _REPLY_CLOSINGS)
    )


def _faq(rng: random.Random) -> str:
    return rng.choice(_FAQ) + rng.choice(_FAQ_TAILS)


def _chat(rng: random.Random) -> str:
    turns = [
        ("Customer", rng.choice(_CHAT_OPENERS)),
        ("Agent", rng.choice(_CHAT_VERIFY)),
        ("Customer", rng.choice(_CHAT_CONFIRMS)),
        ("Agent", rng.choice(_CHAT_ACTIONS)),
        ("Customer", rng.choice(_CHAT_ENDINGS)),
    ]
    return " ".join(f"{who}: {said}" for who, said in turns)


def _notice(rng: random.Random) -> str:
    return f"{rng.choice(_NOTICES)} {rng.choice(_NOTICE_TAILS)}"


def _fill(template: str, rng: random.Random) -> str:
    return template.format(
        product=rng.choice(PRODUCTS),
        issue=rng.choice(ARRIVAL_ISSUES),
        fault=rng.choice(FAULTS),
        plan=rng.choice(PLANS),
        status=rng.choice(DELIVERY_STATUSES),
        channel=rng.choice(CHANNELS),
        when=rng.choice(_WHEN),
        amount=rng.choice(_AMOUNTS),
        n=rng.randint(2, 14),
    )
