"""A synthetic, seeded stand-in for the CFPB complaint-routing task, built without a download.

THE CORPUS IS SYNTHETIC. No row is a real complaint, and no accuracy, F1 or ranking measured on
it says anything about the real CFPB Consumer Complaint Database. It exists so that the pipeline
(data loading, splits, class weighting, training, per-class reports) can be exercised end to end
on a corpus with the *shape* of the real task: about 100 ``Issue`` labels named after the CFPB
Product/Issue taxonomy, a steep long tail, and confusable neighbours.

How it is built:

* **Labels.** ``_PRODUCTS`` below is a literal table: product -> issues, each issue with a few
  distinctive cue clauses. Issue names are unique across products, so ``Issue`` works alone as
  the label. ``n_classes`` takes the first n issues in round-robin order over products, so a
  small corpus still spans several products.
* **Counts.** Class rank r (1-based) gets ``round(max_count * r**-exponent)`` rows, floored at
  ``min_count``. Ranks are assigned by a seeded draw weighted by product, so the head spans
  several products and credit reporting takes the most head ranks, as in the real data.
* **Text.** Each narrative is assembled from phrase pools: a first-person opener, product
  context shared by every issue of that product, timeline sentences with ``XX/XX/XXXX`` dates,
  amounts like ``{$1200.00}``, redacted names ``XXXX XXXX``, what they did, what I want and
  generic boilerplate. Only some narratives state cues of their own issue (1-3 of them): few
  in the broad head classes, nearly all in the niche tail classes. Some borrow a cue of a
  sibling issue (label noise at the text level) or a context sentence of another product.
  Siblings therefore share most of their vocabulary, rare classes are hard (too few examples,
  not too little signal), and a TF-IDF + logistic regression baseline lands well above chance
  but far from saturation: on this function's defaults, accuracy ~0.7 and macro-F1 ~0.21-0.25,
  with ~70 of the 100 classes at zero F1. The ``demo`` preset's corpus is steeper
  (``min_count=5, exponent=1.6``: 73 classes at the floor), and TF-IDF's macro-F1 there is
  ~0.11 (README). Short cue sentences make some narratives identical under two sibling issues
  (10 texts in the preset's corpus); the loader drops such conflicting duplicates, as it would
  in real data.
* **Noise and length.** Most narratives are 20-90 words, some 8-15, a few up to ~200 (mean
  ~50, kept short because decoder backbones pay for every token); a small share is lowercased,
  carries a letter-swap typo, or lost the space after a full stop.

Every draw comes from one ``numpy.random.default_rng(seed)``: the same arguments always give the
same frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from tailtune.errors import TailtuneError

TEXT_COLUMN = "Consumer complaint narrative"

# Text-level difficulty, tuned so that TF-IDF + LogisticRegression on the default corpus lands
# near accuracy 0.7 and macro-F1 0.21-0.25, with most tail classes at zero F1.
# The chance that a narrative states its own issue's cues goes from the tail value (x = 0) to
# the head value (x = 1) along x**2, x the class's log count scaled to [0, 1]: broad head
# issues are described vaguely, niche ones ("Convenience checks") nearly always say what
# they are about, and mid-sized classes stay learnable.
_P_OWN_CUE_HEAD, _P_OWN_CUE_TAIL = 0.2, 0.95
_OWN_CUE_COUNT_P = (0.1, 0.2, 0.7)  # 1, 2 or 3 own cues, given at least one
# A cue borrowed from a sibling issue: label noise at the text level.
_P_SIBLING_CUE = 0.1
# One context sentence from another product, picked by row share: debt collection complaints
# talk about credit reports, card complaints about bank accounts.
_P_FOREIGN_CONTEXT = 0.4
_MODE_P = (0.12, 0.84, 0.04)  # short (8-15 words), normal (20-90), long (up to ~200)
_P_LOWER, _P_TYPO, _P_NO_SPACE = 0.05, 0.08, 0.03


@dataclass(frozen=True)
class _Product:
    """One CFPB product. String fields are "|"-separated pools; ``issues`` maps each issue
    to its "|"-separated distinctive cue clauses (lowercase, first person, no final stop)."""

    name: str
    weight: float  # share of head ranks; credit reporting dominates, as in the real data
    noun: str
    sub_products: str
    companies: str
    context: str
    issues: dict[str, str]


_PRODUCTS = (
    _Product(
        "Credit reporting, credit repair services, or other personal consumer reports",
        8.0,
        "my credit report",
        "Credit reporting|Other personal consumer report|Credit repair services",
        "Equifax|Experian|TransUnion|the credit bureau|XXXX, a consumer reporting agency|the credit reporting agency",
        "I pulled my credit report from all three bureaus|my credit score dropped more than 80 "
        "points|I sent a dispute letter to {company}|I am trying to buy a house and need my credit "
        "fixed|{company} is reporting information that hurts my score|I have disputed this item "
        "several times|the bureau keeps saying the information is accurate|the FCRA gives me the "
        "right to accurate reporting",
        {
            "Incorrect information on your report": "there is an account on my report that is "
            "not mine|the balance they report is wrong|they show a 30 day late payment I never "
            "had|my report lists an address I never lived at|an account I closed years ago shows "
            "as open",
            "Problem with a credit reporting company's investigation into an existing problem": (
                "they verified the account without any proof|they called my dispute frivolous|"
                "they never sent me the results of the reinvestigation|the investigation took "
                "more than 30 days"
            ),
            "Improper use of your report": "there is a hard inquiry I never authorized|someone "
            "pulled my credit without a permissible purpose|a company I never applied with "
            "accessed my file",
            "Unable to get your credit report or credit score": "I cannot get my free annual "
            "credit report online|the website says it cannot verify my identity|they will not "
            "mail me a copy of my file",
            "Problem with fraud alerts or security freezes": "I placed a security freeze on my "
            "file|the fraud alert was lifted without my consent|my PIN to thaw the freeze does "
            "not work",
            "Credit monitoring or identity theft protection services": "they charged me for a "
            "credit monitoring subscription|the identity theft protection never alerted me|I "
            "canceled the monitoring service but they still bill me",
            "Problem with a company's investigation into an existing problem": "the company "
            "closed my case without contacting me|they ignored the documents I uploaded to the "
            "portal|the investigation response was a form letter",
            "Problem with customer service": "the agent hung up on me twice|I was transferred "
            "five times and disconnected|nobody in their call center could answer a question",
            "Incorrect information on credit report": "my report shows a public record that was "
            "dismissed|a collection account is listed twice|my name is misspelled and mixed with "
            "another file",
            "Credit reporting company's investigation": "they did not contact the furnisher "
            "during the dispute|the dispute came back verified within a day|they refuse to give "
            "me the method of verification",
            "Improper use of my credit report": "a landlord ran my credit after I said no|my ex "
            "spouse accessed my report|a car dealer pulled my credit four times",
            "Unable to get credit report/credit score": "the phone system rejected my request "
            "for my report|my score is not available online|they asked for documents I already "
            "sent before they would release my report",
            "Credit monitoring or identity protection": "the monitoring alerts came weeks late|"
            "my identity protection plan renewed automatically|the breach protection product "
            "did not cover my claim",
        },
    ),
    _Product(
        "Debt collection",
        1.6,
        "this debt",
        "I do not know|Other debt|Credit card debt|Medical debt|Auto debt|Telecommunications debt|Rental debt",
        "the debt collector|the collection agency|XXXX Recovery Services|a law firm collecting "
        "for XXXX|XXXX Financial, a debt buyer",
        "a collection agency contacted me about a debt|{company} says I owe {amount}|the original "
        "creditor was XXXX|this account was sold to a debt buyer|they keep calling me about this "
        "account|the collection shows up on my credit report|I have never done business with "
        "this company|the FDCPA protects me from this kind of collection",
        {
            "Attempts to collect debt not owed": "this debt is not mine|I already paid this debt "
            "in full|the debt was discharged in my bankruptcy|the account was opened by an "
            "identity thief",
            "Written notification about debt": "they never sent me a validation notice|the "
            "letter did not name the original creditor|I asked for the debt validation in "
            "writing",
            "False statements or representation": "the collector told me I would be arrested|"
            "they lied about how much I owe|the caller claimed to be from a law office",
            "Took or threatened to take negative or legal action": "they threatened to sue me|"
            "they said they would garnish my wages|they threatened to put a lien on my home",
            "Communication tactics": "they call me ten times a day|they keep calling after I "
            "told them to stop|they call my cell phone before 8 am",
            "Threatened to contact someone or share information improperly": "they called my "
            "employer about the debt|they told my family about my debt|they left details of the "
            "debt on my mother's voicemail",
            "Electronic communications": "they send me text messages about the debt|the "
            "collector emails me every day|they messaged me on social media",
            "Cont'd attempts collect debt not owed": "the same debt keeps coming back from new "
            "agencies|they re-aged the debt on my report|the debt is past the statute of "
            "limitations",
            "Disclosure verification of debt": "they refuse to verify the debt|there is no "
            "itemization of the balance|they will not show a signed contract",
            "Improper contact or sharing of info": "they contacted my neighbor|they keep calling "
            "my work number after I said not to|they sent a postcard that showed it was a debt",
            "Taking/threatening an illegal action": "they took money from my bank account "
            "without a judgment|they threatened criminal charges for a civil debt|they said "
            "they would take my car",
        },
    ),
    _Product(
        "Mortgage",
        1.3,
        "my mortgage",
        "Conventional home mortgage|FHA mortgage|VA mortgage|Home equity loan or line of credit "
        "(HELOC)|Reverse mortgage",
        "my mortgage servicer|the lender|XXXX Mortgage|the loan servicer|XXXX Home Loans",
        "I have had my mortgage with {company} for several years|my home loan was transferred "
        "to {company}|my monthly mortgage payment is {amount}|I have always paid my mortgage on "
        "time|we have lived in this house since XXXX|the servicer keeps losing my paperwork|I "
        "am afraid we are going to lose our home|the loan number is XXXX",
        {
            "Trouble during payment process": "my payment was not applied to the account|they "
            "charged a late fee although I paid on time|the automatic payment was drafted twice|"
            "they returned my payment without explanation",
            "Struggling to pay mortgage": "I applied for a loan modification|they moved toward "
            "foreclosure while my modification was pending|I asked for forbearance after losing "
            "my job|they denied my hardship application",
            "Applying for a mortgage or refinancing an existing mortgage": "my refinance "
            "application has been delayed for months|the appraisal came in low|they keep asking "
            "for the same documents for underwriting|my rate lock expired because of their delay",
            "Closing on a mortgage": "the closing date was pushed back three times|the closing "
            "costs were higher than the loan estimate|I got the closing disclosure the day "
            "before closing",
            "Loan servicing, payments, escrow account": "the escrow shortage doubled my payment|"
            "they failed to pay my property taxes from escrow|they force placed hazard insurance "
            "on my home",
            "Loan modification,collection,foreclosure": "a foreclosure sale date was set|they "
            "lost my modification packet again|I made all the trial period payments",
            "Application, originator, mortgage broker": "the mortgage broker promised me a lower "
            "rate|the loan officer stopped returning my calls|the originator changed the terms "
            "at the last minute",
            "Settlement process and costs": "the title company charged fees I never agreed to|"
            "the settlement statement had errors|they kept my earnest money deposit",
            "Credit decision / Underwriting": "the underwriter denied the loan at the last "
            "minute|they required another verification of employment|my debt to income ratio "
            "was miscalculated",
        },
    ),
    _Product(
        "Checking or savings account",
        1.0,
        "my checking account",
        "Checking account|Savings account|Other banking product or service|CD (Certificate of Deposit)",
        "my bank|the bank|XXXX Bank|the credit union|XXXX Bank, N.A.",
        "I have had a checking account with {company} since XXXX|my direct deposit goes into "
        "this account|I went to the branch and spoke with the manager|the bank's customer "
        "service line could not help me|I have a savings account linked to my checking|my "
        "account balance was {amount}|I checked my account online",
        {
            "Managing an account": "a deposit I made never showed up|they put a hold on my funds "
            "for ten days|my mobile check deposit was rejected|they froze my account for a review",
            "Opening an account": "I never received the sign up bonus|they denied my application "
            "because of ChexSystems|the promotional bonus requirements were changed",
            "Closing an account": "they closed my account without any notice|I cannot get the "
            "remaining balance after they closed the account|I asked them to close the account "
            "but they kept charging fees",
            "Problem with a lender or other company charging your account": "a company keeps "
            "debiting my account|there were unauthorized ACH withdrawals|I revoked the "
            "authorization but the debits continue",
            "Problem caused by your funds being low": "they charged me several overdraft fees in "
            "one day|they reordered my transactions to charge more overdraft fees|I was charged "
            "an insufficient funds fee on a pending charge",
            "Account opening, closing, or management": "the bank froze my account without "
            "explanation|they changed my account type without asking|the account agreement was "
            "never given to me",
            "Deposits and withdrawals": "the ATM did not dispense my cash|they held my check "
            "deposit for two weeks|a teller made an error with my withdrawal",
            "Problems caused by my funds being low": "they paid a check and charged me an NSF "
            "fee|the overdraft protection transfer did not happen|they closed my account "
            "because it was overdrawn",
            "Making/receiving payments, sending money": "my wire transfer never arrived|bill pay "
            "sent my payment to the wrong payee|a payment I received was reversed",
            "Using a debit or ATM card": "someone used my debit card number|the merchant charged "
            "my debit card twice|my debit card claim was denied",
        },
    ),
    _Product(
        "Credit card or prepaid card",
        1.0,
        "my credit card",
        "General-purpose credit card or charge card|Store credit card|General-purpose prepaid "
        "card|Government benefit card|Gift card",
        "the card issuer|my credit card company|XXXX Card Services|XXXX Bank, the card issuer|the prepaid card company",
        "I have had this credit card for years|my credit limit is {amount}|I always pay my card "
        "balance in full|I called the number on the back of my card|my statement closing date "
        "is the XXXX of every month|I use the card for everyday purchases|the card is in good "
        "standing",
        {
            "Problem with a purchase shown on your statement": "there is a charge I do not "
            "recognize|the merchant never delivered the item|I was billed twice for the same "
            "purchase|they denied my chargeback",
            "Fees or interest": "they charged interest during the zero percent promotion|there "
            "is an annual fee I was never told about|they charged me a foreign transaction fee",
            "Other features, terms, or problems": "they changed the terms of my card without "
            "notice|my cash back was never credited|the card benefits were removed",
            "Getting a credit card": "my credit card application was denied|I was approved but "
            "never received the card|they will not tell me why I was declined",
            "Closing your account": "they closed my credit card without warning|closing the card "
            "hurt my utilization|they closed the account for inactivity",
            "Trouble using your card": "my card was declined at the store|the card was locked "
            "for suspected fraud|the chip on my card does not work",
            "Advertising and marketing, including promotional offers": "the advertised bonus "
            "miles were never awarded|the promotional offer in the mailer was not honored|the ad "
            "said no annual fee",
            "Problem when making payments": "my online payment did not post|they charged me a "
            "fee to pay by phone|my payment was processed late by their system",
            "Unauthorized transactions or other transaction problem": "someone drained my "
            "prepaid card balance|there are charges on my prepaid card I did not make|the "
            "transaction was pending for weeks",
            "Problem getting a card or closing an account": "I cannot activate my prepaid card|"
            "the replacement prepaid card never arrived|they will not refund the balance when I "
            "close the card",
            "Convenience checks": "they mailed me convenience checks I never requested|a "
            "convenience check was treated as a cash advance|someone cashed one of my "
            "convenience checks",
            "Billing disputes": "my billing dispute was closed without explanation|they reversed "
            "the provisional credit|the merchant refund never appeared on my bill",
            "Identity theft / Fraud / Embezzlement": "someone opened a credit card in my name|my "
            "fraud claim was denied|they say I am responsible for the fraudulent charges",
            "APR or interest rate": "they raised my APR|a penalty APR was applied after one late "
            "payment|my interest rate is higher than what I was offered",
            "Late fee": "they charged a late fee when my payment was on time|the late fee posted "
            "on the due date|they refuse to waive a one time late fee",
            "Credit line increase/decrease": "they lowered my credit limit without warning|my "
            "credit line increase request was denied|the limit cut maxed out my card",
            "Closing/Cancelling account": "I asked to cancel the card months ago|they reopened "
            "my cancelled account|they still charge fees on a cancelled card",
            "Customer service / Customer relations": "the customer service rep was rude to me|I "
            "waited on hold for two hours|the manager refused to speak to me",
            "Rewards": "my rewards points were forfeited|they will not honor the sign up bonus|"
            "the points expired without notice",
            "Payoff process": "the payoff amount kept changing|I paid off the card but they "
            "billed me again|they will not send a zero balance letter",
            "Delinquent account": "my account was charged off|they sent my card account to "
            "collections|the delinquency was caused by their error",
            "Balance transfer": "my balance transfer was never completed|the balance transfer "
            "rate was not what they promised|the transfer posted to the wrong card",
            "Adding money": "the money I loaded on my prepaid card never appeared|my direct "
            "deposit to the prepaid card is missing|the reload pack did not add funds",
            "Cash advance fee": "they charged a cash advance fee for a purchase|a cash advance "
            "fee for buying a money order|the casino purchase was coded as a cash advance",
            "Unsolicited issuance of credit card": "I received a credit card I never applied "
            "for|they sent me an unsolicited card|a card came in my name but I never asked",
            "Credit determination": "they used the wrong income to set my limit|my approval was "
            "based on an old report|they gave me a lower limit than advertised",
            "Overlimit fee": "they charged an over limit fee|the over limit fee came after their "
            "own hold|I never opted in to over limit",
            "Billing statement": "my monthly statement never arrived|the statement shows the "
            "wrong due date|the paperless statement was not sent",
            "Privacy": "they shared my information with a third party|they sold my data|they "
            "sent my statement to an old address",
            "Balance transfer fee": "the balance transfer fee was five percent instead of three|"
            "they charged a transfer fee on a no fee offer|a second balance transfer fee was "
            "charged",
            "Arbitration": "they forced me into arbitration|the arbitration clause was added "
            "later|I want to opt out of arbitration",
            "Forbearance / Workout plans": "I asked for a hardship plan on my card|the workout "
            "plan was cancelled|they reported me late while on the payment plan",
        },
    ),
    _Product(
        "Student loan",
        0.7,
        "my student loans",
        "Federal student loan servicing|Private student loan",
        "my student loan servicer|Navient|Nelnet|the loan servicer|XXXX Student Loan Servicing",
        "I have federal student loans serviced by {company}|I graduated in XXXX|my student loan "
        "balance is {amount}|my loans were transferred to a new servicer|I have been paying my "
        "student loans for years|the servicer's website shows different information",
        {
            "Dealing with your lender or servicer": "they put my loans into forbearance without "
            "asking|they misapplied my extra payment to interest|my income driven repayment "
            "application was lost",
            "Struggling to repay your loan": "I cannot afford the monthly payment|my loans went "
            "into default|they refuse to lower my payment",
            "Getting a loan": "my private student loan application was denied|the school "
            "certified the wrong amount|the loan disbursement was late for the semester",
            "Can't repay my loan": "they garnished my wages for the student loan|my tax refund "
            "was offset|they will not let me rehabilitate the loan",
            "Dealing with my lender or servicer": "my qualifying payments for public service "
            "loan forgiveness are wrong|they will not process my cosigner release|my "
            "consolidation was never completed",
        },
    ),
    _Product(
        "Vehicle loan or lease",
        0.6,
        "my car loan",
        "Loan|Lease",
        "the auto lender|XXXX Auto Finance|the dealership|the finance company|XXXX Motor Credit",
        "I financed my car through {company}|I bought a used car in XXXX|my car payment is "
        "{amount} a month|the dealer arranged the financing|I need my car to get to work|I have "
        "made every payment on my vehicle",
        {
            "Managing the loan or lease": "my car payment was not credited|they will not refund "
            "my GAP insurance|they charged me for insurance I already had",
            "Problems at the end of the loan or lease": "they charged excessive wear and tear at "
            "lease end|they have not released the lien on my title|the lease buyout price is "
            "wrong",
            "Struggling to pay your loan": "they repossessed my car|I asked for a payment "
            "extension and they refused|they threatened repossession after one late payment",
            "Getting a loan or lease": "the dealer added an extended warranty without asking|the "
            "financing fell through after I drove off the lot|the interest rate changed after I "
            "signed",
            "Problems when you are unable to pay": "the repo company damaged my car|they sold my "
            "car at auction without notice|they kept my personal property from the repossessed "
            "car",
            "Taking out the loan or lease": "the dealer marked up my interest rate|they lied "
            "about the price of the car|I was never given a copy of the contract",
            "Shopping for a loan or lease": "the dealer ran my credit with ten banks|the "
            "advertised car price was not honored|they would not tell me the APR",
            "Problem with additional add-on products or services": "they sold me credit life "
            "insurance I did not want|the service contract was added to my loan|I cannot cancel "
            "the add on products",
        },
    ),
    _Product(
        "Money transfer, virtual currency, or money service",
        0.6,
        "my money transfer",
        "Domestic (US) money transfer|International money transfer|Mobile or digital wallet|"
        "Virtual currency|Money order",
        "the money transfer company|the payment app|XXXX, a money service business|the crypto "
        "exchange|the wire service",
        "I used {company} to send money|I sent {amount} through the app|the transfer was to a "
        "family member|I have the confirmation number for the transfer|I use this app to pay "
        "people|the app support only has a chat bot",
        {
            "Fraud or scam": "I sent money to a scammer|the online seller was fake|I was tricked "
            "into sending money by someone posing as my bank",
            "Other transaction problem": "the transfer was canceled with no explanation|the "
            "recipient never got the money|my transfer is stuck in processing",
            "Money was not available when promised": "the money was not available for days|the "
            "funds were held for review|the pickup location said the money was not there",
            "Unexpected or other fees": "the exchange rate they used was terrible|they charged a "
            "fee that was never disclosed|there was a fee to withdraw my own money",
            "Managing, opening, or closing your mobile wallet account": "my payment app account "
            "was locked|they closed my wallet account and kept my balance|I cannot verify my "
            "identity in the app",
            "Confusing or missing disclosures": "the receipt did not show the fees|nothing told "
            "me the transfer could not be reversed|the terms were only in fine print",
            "Wrong amount charged or received": "the recipient got less than I sent|I was "
            "charged twice for one transfer|my crypto withdrawal was short",
            "Other service problem": "the app crashed in the middle of a transfer|the agent at "
            "the counter refused to help me|nobody answers their support email",
            "Incorrect/missing disclosures or info": "the wire instructions they gave me were "
            "wrong|my receipt had the wrong recipient name|they never told me about the hold",
            "Other transaction issues": "my money order was never cashed and they will not "
            "refund it|the wire was returned but not credited|a transfer was sent without my "
            "approval",
        },
    ),
    _Product(
        "Payday loan, title loan, or personal loan",
        0.5,
        "my loan",
        "Installment loan|Payday loan|Title loan|Personal line of credit|Pawn loan",
        "the online lender|the payday lender|XXXX Cash|the title loan company|XXXX Lending",
        "I took out a loan from {company}|I borrowed {amount} from an online lender|the loan "
        "payments come out of my bank account|I needed money for an emergency|the loan was "
        "supposed to be short term|I have paid far more than I borrowed",
        {
            "Charged fees or interest you didn't expect": "the APR on my installment loan is "
            "over 400 percent|the finance charge was higher than they said|they added a fee "
            "every time they rolled over the loan",
            "Getting the loan": "the online lender asked for my bank login|they approved me then "
            "cancelled the loan|they made me pay a fee before the loan",
            "Problem with the payoff process at the end of the loan": "they will not give me a "
            "payoff amount|I paid off the loan but they keep withdrawing|they say I still owe "
            "after the final payment",
            "Received a loan you didn't apply for": "a loan was deposited into my account that "
            "I never asked for|they want me to repay a loan I did not take|someone used my "
            "information to get a payday loan",
            "Can't contact lender or servicer": "the lender's phone number is disconnected|they "
            "never answer my emails|their office is closed and nobody responds",
            "Charged bank fees or other costs": "their withdrawals caused overdraft fees at my "
            "bank|they ran my debit card several times in one day|my bank charged me fees "
            "because of the lender",
            "Applied for loan/did not receive money": "I was approved but the money never "
            "arrived|the loan funds went to the wrong account|they took a fee but sent no loan",
            "Loan payment wasn't credited to your account": "my title loan payment was not "
            "credited|they say they never got my money order|my payment shows on my bank but not "
            "on the loan",
            "Getting a line of credit": "the line of credit draw was denied|they lowered my line "
            "of credit with no reason|the credit line fees were hidden",
            "Can't stop charges to bank account": "they keep taking money after I revoked the "
            "ACH|I told my bank to stop them but they still debit|they split the payment into "
            "small charges",
        },
    ),
    _Product(
        "Debt or credit management",
        0.3,
        "my debt relief program",
        "Debt settlement|Credit repair services|Mortgage modification or foreclosure avoidance|"
        "Student loan debt relief",
        "the debt relief company|the debt settlement company|XXXX Debt Solutions|the credit counseling agency",
        "I enrolled in a debt settlement program with {company}|I paid them {amount} every "
        "month|they said they would negotiate with my creditors|my creditors kept calling while "
        "I was in the program|I signed up after seeing an ad",
        {
            "Didn't receive services that were advertised": "they never negotiated a single "
            "debt|the program did not lower my debt as promised|they never paid my creditors",
            "Excessive fees": "they took all their fees upfront|the fees were more than the debt "
            "they settled|they charged a fee for every creditor",
            "Confusing or misleading advertising or marketing": "the ad said they were a "
            "government program|they promised my debt would be cut in half|the salesperson "
            "said my credit would not be hurt",
        },
    ),
)

# Real sub-issues exist for most issues; a few are enough to make the column realistic. Issues
# not listed get a missing Sub-issue, as many older real complaints do.
_SUB_ISSUES = {
    "Incorrect information on your report": "Information belongs to someone else|Account "
    "status incorrect|Account information incorrect|Personal information incorrect",
    "Problem with a credit reporting company's investigation into an existing problem": "Their "
    "investigation did not fix an error on your report|Was not notified of investigation "
    "status or results|Investigation took more than 30 days",
    "Improper use of your report": "Reporting company used your report improperly|Credit "
    "inquiries on your report that you don't recognize",
    "Attempts to collect debt not owed": "Debt is not yours|Debt was paid|Debt was result of identity theft",
    "Written notification about debt": "Didn't receive enough information to verify debt|Didn't "
    "receive notice of right to dispute",
    "Communication tactics": "Frequent or repeated calls|Used obscene, profane, or other abusive language",
    "Trouble during payment process": "Payment not applied|Escrow, taxes, or insurance|Fees",
    "Struggling to pay mortgage": "Loan modification|Foreclosure|Forbearance",
    "Managing an account": "Deposits and withdrawals|Funds not handled or disbursed as instructed|Banking errors",
    "Problem with a purchase shown on your statement": "Credit card company isn't resolving a "
    "dispute about a purchase on your statement|Card was charged for something you did not "
    "purchase with the card",
    "Dealing with your lender or servicer": "Trouble with how payments are being handled|Received "
    "bad information about your loan",
    "Managing the loan or lease": "Billing problem|Problem with fees charged",
    "Fraud or scam": "Scam|Fraud",
}

_OPENERS = (
    "I am writing to file a complaint against {company}.|I have been a customer of {company} "
    "for years.|This complaint is about {noun}.|I need help with {company}.|I am filing this "
    "complaint because {company} will not help me.|On {date} I contacted {company} about "
    "{noun}.|This is my third complaint about this.|To whom it may concern,|I want to report "
    "{company}."
)
_TIMELINE = (
    "On {date} I called {company} and spoke with {name}.|I called again on {date} and was told "
    "someone would call me back.|On {date} I sent a letter by certified mail.|I have records "
    "of every call since {date}.|As of {date} nothing has changed.|On {date} I received a "
    "letter from {company}.|I spoke to a supervisor named {name} on {date}.|I submitted "
    "everything they asked for on {date}."
)
_THEY_DID = (
    "They told me there was nothing they could do.|The representative said it would be fixed "
    "in 30 days.|They keep transferring me to different departments.|Every time I call I get "
    "a different answer.|They said they never received my letter.|No one has called me back."
    "|They put me on hold for over an hour.|They asked me to send the same documents again."
    "|{name} said the matter was closed."
)
_AMOUNT = (
    "The amount in question is {amount}.|They are saying I owe {amount}.|This has cost me "
    "{amount} so far.|I paid {amount} on {date}.|The balance shows {amount}."
)
_WANT = (
    "I want this corrected immediately.|Please help me resolve this.|I am asking the CFPB to "
    "look into this.|I want my money back.|I would like a written explanation.|I want them to "
    "fix this and stop.|I just want this resolved."
)
_BOILERPLATE = (
    "This is unacceptable.|This has caused me a lot of stress.|I have done everything they "
    "asked.|I have all of my records and can provide them.|This is affecting my credit score."
    "|I do not know what else to do.|This is a violation of my rights as a consumer.|I feel "
    "like they are taking advantage of me.|They marked it as \" resolved '' but it is not."
)
_CUE_FRAMES = (
    "{cue}.|The problem is that {cue}.|Basically {cue}.|{cue} and nobody will fix it.|I found "
    "out that {cue}.|Again, {cue}.|{cue}."
)
_CONTEXT_FRAMES = "{ctx}.|{ctx}.|For background, {ctx}.|{ctx}, and I have the paperwork."
_NAMES = "XXXX XXXX|XXXX|Mr. XXXX|Ms. XXXX|a rep named XXXX"
_DATES = "XX/XX/XXXX|XX/XX/XXXX|XX/XX/XXXX|XXXX XXXX, 2019|XX/XX/2022|XXXX/XXXX/XXXX"


def _pool(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split("|"))


def _interleaved_issues() -> list[tuple[int, str]]:
    """All (product index, issue) pairs, round-robin over products in table order."""
    issue_lists = [list(p.issues) for p in _PRODUCTS]
    order = []
    for depth in range(max(len(issues) for issues in issue_lists)):
        for product_idx, issues in enumerate(issue_lists):
            if depth < len(issues):
                order.append((product_idx, issues[depth]))
    return order


def _class_counts(n_classes: int, max_count: int, min_count: int, exponent: float) -> np.ndarray:
    """Rows per rank (rank 1 first): round(max_count * r**-exponent), floored at min_count."""
    ranks = np.arange(1, n_classes + 1, dtype=float)
    return np.maximum(np.round(max_count * ranks**-exponent), min_count).astype(np.int64)


def _capitalise(sentence: str) -> str:
    return sentence[:1].upper() + sentence[1:]


def _swap_letters(text: str, pick: int) -> str:
    """Swap two adjacent letters inside one word of five letters or more."""
    words = text.split(" ")
    long_words = [i for i, w in enumerate(words) if len(w) >= 5 and w.isalpha()]
    if not long_words:
        return text
    i = long_words[pick % len(long_words)]
    word = words[i]
    j = 1 + pick % (len(word) - 2)
    words[i] = word[:j] + word[j + 1] + word[j] + word[j + 2 :]
    return " ".join(words)


def _amounts(rng: np.random.Generator, n: int) -> list[str]:
    """Redacted-style dollar amounts: ``{$1200.00}``, mostly round, occasionally with cents."""
    dollars = np.exp(rng.normal(6.2, 1.3, size=n))
    step = np.where(rng.random(n) < 0.7, np.where(dollars > 1000, 100.0, 25.0), 0.01)
    dollars = np.maximum(np.round(dollars / step) * step, 5.0)
    return [f"{{${d:.2f}}}" for d in dollars]


def make_demo_corpus(
    n_classes: int = 100,
    max_count: int = 1100,
    min_count: int = 4,
    exponent: float = 1.3,
    seed: int = 0,
) -> pd.DataFrame:
    """A synthetic long-tailed complaint corpus with the columns of the CFPB export.

    Args:
        n_classes: number of ``Issue`` labels, at most the size of the built-in taxonomy (111).
        max_count: rows of the rank-1 (head) class.
        min_count: floor on rows per class; the tail classes get exactly this many.
        exponent: Zipf exponent; rank r gets ``round(max_count * r**-exponent)`` rows.
        seed: seed of the one ``numpy.random.default_rng`` behind every draw.

    Returns:
        One row per complaint, shuffled, with columns ``Complaint ID`` (unique int),
        ``Product``, ``Sub-product``, ``Issue``, ``Sub-issue`` (missing for issues without
        listed sub-issues) and ``Consumer complaint narrative``. With the defaults: 3,424 rows,
        the head class 1,100 rows, the last 32 classes ``min_count`` rows each, ~50 words per
        narrative on average.
    """
    catalogue = _interleaved_issues()
    if not 1 <= n_classes <= len(catalogue):
        raise TailtuneError(f"n_classes must be between 1 and {len(catalogue)}, got {n_classes}")
    if not 1 <= min_count <= max_count:
        raise TailtuneError(f"need 1 <= min_count <= max_count, got min_count={min_count}, max_count={max_count}")
    if exponent < 0:
        raise TailtuneError(f"exponent must be >= 0, got {exponent}")

    rng = np.random.default_rng(seed)
    chosen = catalogue[:n_classes]
    product_of = np.array([p for p, _ in chosen])
    issue_names = [name for _, name in chosen]

    # Seeded ranks. Within a product, table order (current issues first) jittered by up to
    # three places; across products the k-th issue of a product with weight w is keyed near
    # k / w, so the head spans several products and heavy products fill more of it.
    within = np.empty(n_classes)
    for p in np.unique(product_of):
        members = np.flatnonzero(product_of == p)
        jittered = np.arange(len(members)) + 3.0 * rng.random(len(members))
        within[members] = np.argsort(np.argsort(jittered))
    weights = np.array([_PRODUCTS[p].weight for p in product_of])
    rank_order = np.argsort((within + rng.random(n_classes)) / weights, kind="stable")
    counts = np.empty(n_classes, dtype=np.int64)
    counts[rank_order] = _class_counts(n_classes, max_count, min_count, exponent)

    labels = rng.permutation(np.repeat(np.arange(n_classes), counts))  # (N,) class per row
    n = len(labels)

    products = [_PRODUCTS[p] for p in product_of]
    cues = [_pool(products[c].issues[issue_names[c]]) for c in range(n_classes)]
    class_sub_issues = [_pool(_SUB_ISSUES[name]) if name in _SUB_ISSUES else () for name in issue_names]
    siblings = [np.flatnonzero((product_of == product_of[c]) & (np.arange(n_classes) != c)) for c in range(n_classes)]
    # A borrowed cue comes from a sibling in proportion to its size: confusion flows mostly
    # between frequent issues, and a rare issue's few cues are not drowned by leaks from the head.
    sibling_cdf = [np.cumsum(counts[s]) / counts[s].sum() if len(s) else s for s in siblings]
    product_pools = {
        p: (
            _pool(_PRODUCTS[p].context),
            _pool(_PRODUCTS[p].companies),
            _pool(_PRODUCTS[p].sub_products),
        )
        for p in np.unique(product_of)
    }
    present_products = np.unique(product_of)
    product_rows = np.array([counts[product_of == p].sum() for p in present_products])
    product_cdf = np.cumsum(product_rows) / product_rows.sum()
    openers, timeline, they_did = _pool(_OPENERS), _pool(_TIMELINE), _pool(_THEY_DID)
    amount_lines, wants, boilerplate = _pool(_AMOUNT), _pool(_WANT), _pool(_BOILERPLATE)
    cue_frames, context_frames = _pool(_CUE_FRAMES), _pool(_CONTEXT_FRAMES)
    names, dates = _pool(_NAMES), _pool(_DATES)

    # Every random quantity is drawn here, in bulk; the loop below only indexes and joins.
    mode = rng.choice(3, size=n, p=_MODE_P)  # 0 short, 1 normal, 2 long
    log_counts = np.log(counts)
    spread = max(log_counts.max() - log_counts.min(), 1e-9)
    p_own = _P_OWN_CUE_TAIL + (_P_OWN_CUE_HEAD - _P_OWN_CUE_TAIL) * ((log_counts - log_counts.min()) / spread) ** 2
    n_own = np.where(rng.random(n) < p_own[labels], 1 + rng.choice(3, size=n, p=_OWN_CUE_COUNT_P), 0)
    has_sibling = rng.random(n) < _P_SIBLING_CUE
    # pick[i, slot] % len(pool) chooses from a pool; each slot serves one choice only, so
    # editing one pool or choice leaves every other draw of the corpus unchanged.
    pick = rng.integers(0, 1 << 30, size=(n, 25))
    coin = rng.random((n, 10))  # optional-sentence coins (normal mode) and noise coins
    order_keys = rng.random((n, 24))  # shuffles the middle sentences
    n_context = np.where(mode == 2, 4, 1 + (rng.random(n) < 0.6))
    amounts = _amounts(rng, n)

    sub_products, sub_issues, narratives = [], [], []
    for i in range(n):
        c = labels[i]
        k = pick[i]
        context, companies, subs = product_pools[product_of[c]]
        sub_products.append(subs[k[0] % len(subs)])
        issue_subs = class_sub_issues[c]
        sub_issues.append(issue_subs[k[1] % len(issue_subs)] if issue_subs else None)
        fill = {
            "company": companies[k[2] % len(companies)],
            "name": names[k[3] % len(names)],
            "date": dates[k[4] % len(dates)],
            "amount": amounts[i],
            "noun": products[c].noun,
        }

        own = cues[c]
        cue_lines = [
            cue_frames[k[6 + j] % len(cue_frames)].replace("{cue}", own[(k[5] + j) % len(own)])
            for j in range(min(n_own[i], len(own)))
        ]
        if has_sibling[i] and len(siblings[c]):
            donor = siblings[c][np.searchsorted(sibling_cdf[c], coin[i, 7], side="right")]
            sib = cues[donor]
            cue_lines.append(cue_frames[k[10] % len(cue_frames)].replace("{cue}", sib[k[11] % len(sib)]))
        context_lines = [
            context_frames[k[12 + j] % len(context_frames)].replace("{ctx}", context[(k[16] + j) % len(context)])
            for j in range(n_context[i])
        ]
        if mode[i] != 0 and coin[i, 8] < _P_FOREIGN_CONTEXT:
            foreign = present_products[np.searchsorted(product_cdf, coin[i, 9], side="right")]
            foreign_context = product_pools[foreign][0]
            context_lines[-1] = foreign_context[k[24] % len(foreign_context)] + "."

        if mode[i] == 0:
            # One sentence, the cue when there is one: short complaints are often all point.
            sentences = cue_lines[:1] or context_lines[:1]
        else:
            long = mode[i] == 2
            middle = cue_lines + context_lines
            if long or coin[i, 0] < 0.6:
                middle.append(timeline[k[17] % len(timeline)])
            if long or coin[i, 1] < 0.5:
                middle.append(they_did[k[18] % len(they_did)])
            if long or coin[i, 2] < 0.45:
                middle.append(amount_lines[k[19] % len(amount_lines)])
            if long:
                middle += [
                    timeline[(k[17] + 1) % len(timeline)],
                    they_did[(k[18] + 1) % len(they_did)],
                ]
            middle = [middle[j] for j in np.argsort(order_keys[i, : len(middle)])]
            sentences = [openers[k[20] % len(openers)]] if long or coin[i, 3] < 0.6 else []
            sentences += middle
            if long or coin[i, 4] < 0.5:
                sentences.append(wants[k[21] % len(wants)])
            if long or coin[i, 5] < 0.35:
                sentences.append(boilerplate[k[22] % len(boilerplate)])
            if long:
                sentences.append(boilerplate[(k[22] + 1) % len(boilerplate)])
        if sum(len(s.split()) for s in sentences) < 8:
            sentences.append(wants[k[21] % len(wants)])
        text = " ".join(_capitalise(s.format_map(fill)) for s in sentences)

        noise = coin[i, 6]
        if noise < _P_LOWER:
            text = text.lower()
        elif noise < _P_LOWER + _P_TYPO:
            text = _swap_letters(text, int(k[23]))
        elif noise < _P_LOWER + _P_TYPO + _P_NO_SPACE:
            text = text.replace(". ", ".", 1)
        narratives.append(text)

    complaint_ids = 2_000_000 + np.cumsum(rng.integers(1, 400, size=n))
    return pd.DataFrame(
        {
            "Complaint ID": complaint_ids.astype(np.int64),
            "Product": [_PRODUCTS[product_of[c]].name for c in labels],
            "Sub-product": sub_products,
            "Issue": [issue_names[c] for c in labels],
            "Sub-issue": sub_issues,
            TEXT_COLUMN: narratives,
        }
    )


# Words of the bulk texts in scale tests and benchmarks: what matters there is row count, not meaning.
BULK_WORDS = [
    "loan",
    "card",
    "bank",
    "fee",
    "late",
    "payment",
    "credit",
    "report",
    "mortgage",
    "debt",
    "collector",
    "fraud",
    "account",
    "interest",
    "statement",
    "dispute",
    "lender",
    "servicer",
    "scam",
    "notice",
]


def bulk_texts(n: int, rng, words: int = 6) -> list[str]:
    """``n`` short texts of ``words`` random :data:`BULK_WORDS` each, for throughput tests."""
    import numpy as np

    return [" ".join(row) for row in rng.choice(np.array(BULK_WORDS), size=(n, words))]
