"""Support-text skeletons shared by the regional records and the public corpus."""

# (kind, template). Every region's synthetic records draw from these with personal data in the
# slots; the public pre-training corpus draws from them with placeholders instead.
COMMON_TEMPLATES = (
    (
        "ticket",
        "Hello, my name is {name} and I ordered a {product} on {date} (order {order}). It arrived {issue}. "
        "Please send a replacement to {address} or refund the {amount} I paid. You can reach me on {phone} "
        "during the day.",
    ),
    (
        "ticket",
        "Subject: refund not received. Dear support, I returned a {product} from order {order} {days} days "
        "ago and the {amount} refund has still not arrived. The account is registered to {email}. Please "
        "check what happened. Regards, {name}",
    ),
    (
        "ticket",
        "I was charged twice for order {order}, {amount} each time, on my card {card}. Please reverse the "
        "duplicate payment as soon as possible. My name is {name} and my phone number is {phone}. Thank you.",
    ),
    (
        "ticket",
        "Please update the delivery address on my account {email} to {address}. I have moved and the "
        "{product} I ordered on {date} should go to the new address, not the old one. Thanks, {first_name}",
    ),
    (
        "ticket",
        "Hi, this is {name}. My {plan} plan was changed without my consent and my latest bill is {amount} "
        "higher than usual. Please call me back on {phone} to put it right and refund the difference.",
    ),
    (
        "ticket",
        "Complaint about {courier}: the driver left my parcel (order {order}) outside in the rain at "
        "{address}. The {product} inside is ruined. I want a replacement, not a voucher. {name}",
    ),
    (
        "ticket",
        "My account {email} was locked after I tried to reset the password. I can confirm my date of birth "
        "is {dob} and my phone number is {phone}. Please unlock it so I can track order {order}.",
    ),
    (
        "ticket",
        "Identity check for a new contract: {name}, born {dob}, {id_label} {national_id}. I am applying for "
        "the {plan} plan with a new smartphone on instalments. Please tell me if you need other documents.",
    ),
    (
        "ticket",
        "Hello, I want to cancel my {plan} subscription at the end of this billing period. Account holder: "
        "{name}, email {email}. Please confirm the cancellation in writing and do not charge my card again.",
    ),
    (
        "ticket",
        "Warranty claim: my {product} from order {order}, bought on {date}, {fault}. I still have the "
        "receipt. Please arrange a pickup from {address} on a weekday and call {phone} before the courier "
        "comes.",
    ),
    (
        "ticket",
        "Hi, I would like to change the email on my account from {email} to a new one. I can verify myself "
        "with my phone number {phone} or my date of birth {dob}. Thanks, {name}",
    ),
    (
        "ticket",
        "Feedback on order {order}: the delivery by {courier} was fast, but the {product} came in a huge box "
        "full of plastic. Please use less packaging next time. Otherwise I am happy. {first_name}",
    ),
    (
        "chat",
        "Customer: hi, where is my order {order}? tracking says {status} since {date}. Agent: Sorry for the "
        "wait! Can you confirm the name and phone number on the order? Customer: {name}, {phone}. Agent: "
        "Thanks, I have escalated it with {courier}.",
    ),
    (
        "chat",
        "Customer: my {product} {fault} after two days. Agent: I'm sorry to hear that. Could you share the "
        "email address on the account? Customer: {email}. Agent: Thank you, a prepaid return label is on its "
        "way to you.",
    ),
    (
        "chat",
        "Agent: Hello, how can I help? Customer: I moved, my new address is {address}. Agent: Done, I have "
        "updated it. Anything else? Customer: yes, the {product} from order {order} still shows the old "
        "address.",
    ),
    (
        "chat",
        "Customer: can you send the invoice for order {order} to {email}? I need it for my expenses. Agent: "
        "Of course. The invoice for {amount} including {tax} has been sent. Customer: got it, thanks.",
    ),
    (
        "chat",
        "Customer: my SIM stopped working this morning, my number is {phone}. Agent: Let me check. For "
        "security, what is your date of birth? Customer: {dob}. Agent: Thanks {first_name}, I have reset the "
        "network registration, please restart your phone.",
    ),
    (
        "chat",
        "Customer: I did not order this! Someone used my card {card} to buy a {product}. Agent: I'm sorry, I "
        "have blocked the card on your account and opened a fraud case. Can you confirm your email? "
        "Customer: {email}.",
    ),
    (
        "chat",
        "Customer: the {product} you sent is the wrong colour. Agent: Apologies! I can swap it. Is the "
        "delivery address still {address}? Customer: yes, same as before. Agent: Great, the courier will "
        "collect it on {date}.",
    ),
    (
        "profile",
        "Account profile. Name: {name}. Email: {email}. Phone: {phone}. Address: {address}. Date of birth: "
        "{dob}. {id_label}: {national_id}. Plan: {plan}. Preferred contact: {channel}. Marketing emails: "
        "{opt}.",
    ),
    (
        "profile",
        "Customer record for {name}: registered on {date}, shipping address {address}, contact {email} or "
        "{phone}. Default payment card {card}. Loyalty tier: {tier}. Last order {order} for {amount}.",
    ),
    (
        "profile",
        "Verification note: customer {name}, born {dob}, verified with {id_label} {national_id} for a "
        "postpaid {plan} contract. Contact number {phone}. Billing address {address}. Documents checked "
        "in store.",
    ),
    (
        "profile",
        "Contact preferences for {name} ({email}): SMS to {phone} allowed, post to {address} {opt2}, phone "
        "calls not allowed. Last updated on {date} via {channel}. Loyalty tier {tier}.",
    ),
)
