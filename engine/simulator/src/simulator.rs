//! The simulator itself. The design is described in the module docs (`generator/mod.rs`).

use std::fmt;
use std::sync::Arc;

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use spendflow_operators::model::{
    Expense, ExpenseId, MAX_ABS_AMOUNT_MINOR, MS_PER_DAY, Record, UserId, civil_from_days,
};

use super::config::{ConfigError, GeneratorConfig, MAX_EVENT_MS};

// ---------------------------------------------------------------------------------------------
// Public types
// ---------------------------------------------------------------------------------------------

/// A spending category. Every merchant has exactly one; each category has its own amount
/// distribution and its own share of new expenses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    /// Supermarkets.
    Groceries,
    /// Restaurants and take-away.
    Restaurants,
    /// Coffee shops and bakeries.
    Cafes,
    /// Public transport, taxis, ride hailing, scooters.
    Transport,
    /// Clothes, household, electronics, online shops.
    Shopping,
    /// Petrol stations.
    Fuel,
    /// Cinemas, concerts, games.
    Entertainment,
    /// Streaming, software, news.
    Subscriptions,
    /// Pharmacies, doctors, gyms.
    Health,
    /// Flights, hotels, car rental.
    Travel,
    /// Phone, internet, energy, water.
    Utilities,
}

impl Category {
    /// Every category, most frequent first.
    pub const ALL: [Category; 11] = [
        Category::Groceries,
        Category::Restaurants,
        Category::Cafes,
        Category::Transport,
        Category::Shopping,
        Category::Fuel,
        Category::Entertainment,
        Category::Subscriptions,
        Category::Health,
        Category::Travel,
        Category::Utilities,
    ];

    /// The name used in records (`"groceries"`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Category::Groceries => "groceries",
            Category::Restaurants => "restaurants",
            Category::Cafes => "cafes",
            Category::Transport => "transport",
            Category::Shopping => "shopping",
            Category::Fuel => "fuel",
            Category::Entertainment => "entertainment",
            Category::Subscriptions => "subscriptions",
            Category::Health => "health",
            Category::Travel => "travel",
            Category::Utilities => "utilities",
        }
    }

    fn spec(self) -> &'static CategorySpec {
        &CATEGORY_SPECS[self as usize]
    }
}

impl fmt::Display for Category {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A merchant: a unique name and its fixed category.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Merchant {
    /// Unique name, 1 to 64 characters (some contain non-ASCII letters or quotes).
    pub name: Arc<str>,
    /// The category of every expense at this merchant (until a correction recategorises one).
    pub category: Category,
}

/// A simulated user, as the Personnel service and the MySQL `users` table show them.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct UserProfile {
    /// The user id, `1..=users`.
    pub user_id: UserId,
    /// Display name (may contain non-ASCII letters).
    pub name: String,
    /// Unique ASCII e-mail address at a reserved example domain.
    pub email: String,
    /// ISO 3166-1 alpha-2 country code.
    pub country: String,
    /// ISO 4217 code of the currency all of the user's expenses are in.
    pub currency: String,
    /// Monthly budget in minor units of `currency`, calibrated to the user's simulated spending
    /// so that some users stay under it and some go over.
    pub monthly_budget_minor: i64,
    /// The user's card ids, `c-<user>-1` to `c-<user>-<n>`, `n` from 1 to 3.
    pub cards: Vec<String>,
}

/// What kind of record [`Simulator::next_record`] produced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GeneratedKind {
    /// A new expense at the current stream time.
    New,
    /// An earlier live expense re-sent with a changed amount (sometimes merchant or category).
    Correction,
    /// A delete of an earlier live expense.
    Delete,
    /// The exact bytes of an earlier record again: the latest record of a live expense, or an
    /// earlier delete. Applying it changes nothing.
    Duplicate,
    /// A new expense with a negative amount, at a merchant where the user spent before.
    Refund,
    /// A new expense whose event time is up to `late_max_ms` before the stream time.
    Late,
    /// Bytes the decoder must reject; the label (one of [`MALFORMED_KINDS`]) names the damage.
    Malformed(&'static str),
}

impl GeneratedKind {
    /// A short stable label: `new`, `correction`, ..., or the malformed kind's own label.
    pub fn label(&self) -> &'static str {
        match self {
            GeneratedKind::New => "new",
            GeneratedKind::Correction => "correction",
            GeneratedKind::Delete => "delete",
            GeneratedKind::Duplicate => "duplicate",
            GeneratedKind::Refund => "refund",
            GeneratedKind::Late => "late",
            GeneratedKind::Malformed(label) => label,
        }
    }

    /// Whether the record is malformed (and has no `record`).
    pub fn is_malformed(&self) -> bool {
        matches!(self, GeneratedKind::Malformed(_))
    }
}

/// Every label of [`GeneratedKind::Malformed`], each a different way a record can be broken.
pub const MALFORMED_KINDS: [&str; 13] = [
    "truncated_json",
    "float_amount",
    "missing_field",
    "bad_currency",
    "unknown_op",
    "bad_timestamp",
    "amount_out_of_range",
    "not_an_object",
    "invalid_utf8",
    "user_id_zero",
    "wrong_type",
    "concatenated",
    "duplicate_field",
];

/// One simulated record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Generated {
    /// The user the record belongs to: its key, and its topic with one topic per user. For a
    /// malformed record, the user it was generated for (the bytes may say otherwise).
    pub user_id: UserId,
    /// What kind of record this is.
    pub kind: GeneratedKind,
    /// The record as JSON v1, without a trailing newline.
    pub bytes: Vec<u8>,
    /// What `decode(&bytes)` returns for a valid record; `None` for a malformed one.
    pub record: Option<Record>,
}

// ---------------------------------------------------------------------------------------------
// Built-in tables
// ---------------------------------------------------------------------------------------------

/// The fixed facts about one category.
struct CategorySpec {
    /// Share of new expenses, per mille (the shares add up to 1000).
    share: u64,
    /// Amount distribution in euro cents: minimum, the nine deciles, maximum. A draw picks one of
    /// the ten segments uniformly, then a value uniformly inside it, so the table is exactly the
    /// distribution's quantile function (piecewise linear), with a long right tail.
    quantiles: [i64; 11],
    /// Merchant names, most popular first.
    names: &'static [&'static str],
}

const CATEGORY_SPECS: [CategorySpec; 11] = [
    CategorySpec {
        share: 230,
        quantiles: [
            500, 900, 1400, 1900, 2500, 3200, 4000, 5000, 6500, 9000, 15000,
        ],
        names: &[
            "Tesco",
            "Lidl",
            "Aldi",
            "Carrefour",
            "Rewe",
            "Edeka",
            "Sainsbury's",
            "Albert Heijn",
            "Mercadona",
            "Whole Foods",
            "Trader Joe's",
            "Migros",
            "Coop",
            "Waitrose",
            "Monoprix",
            "Spar",
            "Kaufland",
            "Safeway",
            "Esselunga",
            "Biedronka",
            "Netto",
            "Jumbo",
        ],
    },
    CategorySpec {
        share: 150,
        quantiles: [
            800, 1400, 1900, 2400, 2900, 3500, 4200, 5200, 6800, 9500, 25000,
        ],
        names: &[
            "Pizzeria Da Mario",
            "Nando's",
            "Wagamama",
            "Le Petit Bistro",
            "Burger Palace",
            "Sushi Zen",
            "Taj Mahal Curry House",
            "La Taqueria",
            "Brasserie Lipp",
            "Zur Goldenen Gans",
            "Trattoria Bella",
            "Five Guys",
            "Dishoom",
            "Café de Flore",
            "Phở 24",
            "The Ivy",
            "Bar \"Zum Hirsch\"",
            "Smokehouse BBQ",
        ],
    },
    CategorySpec {
        share: 120,
        quantiles: [200, 280, 350, 420, 480, 550, 650, 780, 950, 1300, 2500],
        names: &[
            "Starbucks",
            "Costa Coffee",
            "Pret A Manger",
            "Caffè Nero",
            "Blue Bottle",
            "Tim Hortons",
            "Espresso House",
            "Balzac Coffee",
            "Joe & The Juice",
            "Le Pain Quotidien",
            "Tchibo",
            "Coffee Fellows",
        ],
    },
    CategorySpec {
        share: 120,
        quantiles: [150, 240, 290, 350, 480, 650, 900, 1300, 2000, 3500, 12000],
        names: &[
            "Uber",
            "Bolt",
            "FreeNow",
            "Deutsche Bahn",
            "SNCF",
            "Transport for London",
            "BVG",
            "RATP",
            "Lime",
            "Trenitalia",
            "Renfe",
            "NS",
            "SBB CFF FFS",
            "Lyft",
            "FlixBus",
            "Tier",
        ],
    },
    CategorySpec {
        share: 100,
        quantiles: [
            500, 1200, 2000, 2900, 3900, 5000, 6500, 8500, 12000, 20000, 150000,
        ],
        names: &[
            "Amazon",
            "Zalando",
            "IKEA",
            "H&M",
            "Zara",
            "MediaMarkt",
            "Decathlon",
            "Uniqlo",
            "Fnac",
            "El Corte Inglés",
            "Primark",
            "Apple Store",
            "Boots",
            "dm-drogerie markt",
            "Muji",
            "John Lewis",
        ],
    },
    CategorySpec {
        share: 60,
        quantiles: [
            1500, 2500, 3500, 4200, 5000, 5800, 6500, 7500, 8500, 10000, 15000,
        ],
        names: &[
            "Shell",
            "BP",
            "Aral",
            "TotalEnergies",
            "Esso",
            "Repsol",
            "Eni",
            "OMV",
            "Q8",
            "Texaco",
            "Circle K",
            "Jet",
        ],
    },
    CategorySpec {
        share: 60,
        quantiles: [
            500, 900, 1200, 1500, 1900, 2400, 3000, 4000, 5500, 9000, 30000,
        ],
        names: &[
            "Cineworld",
            "Odeon",
            "Pathé",
            "Ticketmaster",
            "Eventim",
            "Steam",
            "PlayStation Store",
            "Bowling World",
            "Escape Room",
            "Museum Shop",
            "Comedy Club",
            "Concert Hall",
        ],
    },
    CategorySpec {
        share: 50,
        quantiles: [299, 499, 799, 999, 1099, 1299, 1499, 1799, 2299, 3499, 5999],
        names: &[
            "Netflix",
            "Spotify",
            "Disney+",
            "Apple iCloud",
            "YouTube Premium",
            "Amazon Prime",
            "Deezer",
            "Dropbox",
            "Microsoft 365",
            "The Guardian",
            "Le Monde",
            "Audible",
        ],
    },
    CategorySpec {
        share: 40,
        quantiles: [
            500, 900, 1300, 1800, 2500, 3500, 5000, 7000, 11000, 20000, 50000,
        ],
        names: &[
            "Boots Pharmacy",
            "Apotheke am Markt",
            "Pharmacie Centrale",
            "DentalCare",
            "Vision Express",
            "Fitness First",
            "McFit",
            "Basic-Fit",
            "Physio Plus",
            "Dr. Müller Praxis",
            "Specsavers",
            "Holland & Barrett",
        ],
    },
    CategorySpec {
        share: 40,
        quantiles: [
            5000, 8000, 11000, 15000, 19000, 25000, 32000, 42000, 60000, 90000, 200000,
        ],
        names: &[
            "Ryanair",
            "easyJet",
            "Lufthansa",
            "Air France",
            "British Airways",
            "KLM",
            "Booking.com",
            "Airbnb",
            "Expedia",
            "Hilton",
            "Marriott",
            "Accor",
            "Eurostar",
            "Hertz",
            "Sixt",
            "Iberia",
        ],
    },
    CategorySpec {
        share: 30,
        quantiles: [
            2000, 3000, 4000, 5000, 6000, 7000, 8500, 10000, 13000, 18000, 40000,
        ],
        names: &[
            "Vodafone",
            "Telekom",
            "Orange",
            "EDF",
            "E.ON",
            "Octopus Energy",
            "Iberdrola",
            "Enel",
            "Thames Water",
            "O2",
            "Swisscom",
            "Virgin Media",
        ],
    },
];

/// Branch names that make merchant names unique once a category's base names run out.
const CITIES: [&str; 24] = [
    "Berlin",
    "Paris",
    "London",
    "Madrid",
    "Rome",
    "Amsterdam",
    "Vienna",
    "Zürich",
    "Stockholm",
    "Warsaw",
    "Lisbon",
    "Dublin",
    "Munich",
    "Milan",
    "Barcelona",
    "Lyon",
    "Hamburg",
    "Prague",
    "Brussels",
    "Copenhagen",
    "New York",
    "Toronto",
    "Tokyo",
    "Sydney",
];

/// A currency and its value: minor units worth one euro cent, in thousandths.
struct CurrencySpec {
    code: [u8; 3],
    minor_per_eur_cent_milli: i64,
}

const CURRENCIES: [CurrencySpec; 9] = [
    CurrencySpec {
        code: *b"EUR",
        minor_per_eur_cent_milli: 1000,
    },
    CurrencySpec {
        code: *b"USD",
        minor_per_eur_cent_milli: 1080,
    },
    CurrencySpec {
        code: *b"GBP",
        minor_per_eur_cent_milli: 850,
    },
    CurrencySpec {
        code: *b"CHF",
        minor_per_eur_cent_milli: 950,
    },
    CurrencySpec {
        code: *b"SEK",
        minor_per_eur_cent_milli: 11_500,
    },
    CurrencySpec {
        code: *b"PLN",
        minor_per_eur_cent_milli: 4300,
    },
    // The yen has no minor unit: one euro cent is 1.6 yen.
    CurrencySpec {
        code: *b"JPY",
        minor_per_eur_cent_milli: 1600,
    },
    CurrencySpec {
        code: *b"CAD",
        minor_per_eur_cent_milli: 1480,
    },
    CurrencySpec {
        code: *b"AUD",
        minor_per_eur_cent_milli: 1650,
    },
];

/// Home countries: code, index into [`CURRENCIES`], share of users in percent (adds up to 100).
const COUNTRIES: [(&str, usize, u64); 14] = [
    ("DE", 0, 18),
    ("FR", 0, 14),
    ("US", 1, 14),
    ("GB", 2, 12),
    ("ES", 0, 8),
    ("IT", 0, 8),
    ("NL", 0, 5),
    ("PL", 5, 4),
    ("JP", 6, 4),
    ("CH", 3, 3),
    ("SE", 4, 3),
    ("CA", 7, 3),
    ("IE", 0, 2),
    ("AU", 8, 2),
];

const FIRST_NAMES: [&str; 48] = [
    "Anna", "Ben", "Chloé", "David", "Elena", "Farid", "Greta", "Hiro", "Inès", "Jonas", "Kai",
    "Lena", "Mateo", "Nora", "Oliver", "Priya", "Quentin", "Rosa", "Søren", "Tomás", "Ursula",
    "Viktor", "Wei", "Ximena", "Yusuf", "Zoë", "Amélie", "Björn", "Carmen", "Diego", "Emma",
    "Fatima", "Giulia", "Hannah", "Ibrahim", "Julia", "Kenji", "Liam", "Maja", "Noah", "Olga",
    "Paul", "Sofia", "Lukas", "Aisha", "Marek", "Chen", "Sven",
];

const LAST_NAMES: [&str; 40] = [
    "Müller",
    "Schmidt",
    "Dubois",
    "Martin",
    "García",
    "Rossi",
    "Smith",
    "Jones",
    "Johnson",
    "Brown",
    "Nowak",
    "Kowalski",
    "Jansen",
    "de Vries",
    "Andersson",
    "Nilsson",
    "Tanaka",
    "Suzuki",
    "Lefèvre",
    "Fernández",
    "Bianchi",
    "O'Brien",
    "Murphy",
    "Wilson",
    "Taylor",
    "Novák",
    "Horvat",
    "Papadopoulos",
    "Yılmaz",
    "Kim",
    "Nguyen",
    "Singh",
    "Cohen",
    "Costa",
    "Silva",
    "Weber",
    "Fischer",
    "Moreau",
    "Ricci",
    "Larsen",
];

/// Reserved example domains (RFC 2606), so no address can reach a real mailbox.
const EMAIL_DOMAINS: [&str; 3] = ["example.com", "example.org", "example.net"];

/// Skew of user activity: bucket `b` (ranks `2^b - 1 ..= 2^(b+1) - 2`) weighs `1.149^b`, i.e.
/// about `2^0.2` per doubling, which is a Zipf law with exponent 0.8 (see [`Skew`]).
const USER_SKEW: (u64, u64) = (1149, 1000);

/// Skew of merchant popularity inside a category: every doubling of rank weighs the same, a Zipf
/// law with exponent 1 (the market leader takes the largest single share).
const MERCHANT_SKEW: (u64, u64) = (1, 1);

/// Share of duplicates that repeat a delete rather than an upsert (out of 10).
const DUPLICATE_DELETE_TENTHS: u64 = 1;

/// How many recent deletes are kept for duplicate deliveries.
const DELETED_WINDOW: usize = 1024;

// ---------------------------------------------------------------------------------------------
// Small deterministic building blocks
// ---------------------------------------------------------------------------------------------

/// The SplitMix64 finaliser: a bijection on `u64` that scrambles every bit into every other.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// SplitMix64: a tiny counter-based generator, used where a value must be a pure function of
/// `(seed, something)` (user profiles) rather than of the position in the stream.
#[derive(Clone, Copy, Debug)]
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }
}

/// A uniform integer in `0..n` from 64 random bits (multiply-shift; `0` when `n == 0`).
///
/// Written out rather than taken from `rand` so that the output stays byte-identical across
/// `rand` versions: the only thing relied on is ChaCha8's documented stream of `u64`s.
fn below(random: u64, n: u64) -> u64 {
    ((u128::from(random) * u128::from(n)) >> 64) as u64
}

/// A skewed distribution over ranks `0..n`, without per-rank tables and without floats.
///
/// Ranks are grouped in doubling buckets (`{0}`, `{1, 2}`, `{3..=6}`, ...). Bucket `b` weighs
/// `ratio^b` (the last, partial bucket in proportion to the ranks it has), and ranks inside a
/// bucket are equally likely. With `ratio = 2^(1-s)` this follows a Zipf law with exponent `s`
/// within a factor of two per rank, costs one binary search over at most 64 buckets per draw,
/// and is exact integer arithmetic, hence identical on every platform.
#[derive(Clone, Debug)]
struct Skew {
    n: u64,
    /// Cumulative bucket weights.
    cumulative: Vec<u64>,
}

impl Skew {
    fn new(n: u64, (num, den): (u64, u64)) -> Skew {
        let mut cumulative = Vec::new();
        let mut weight: u128 = 1 << 40;
        let mut total: u128 = 0;
        let mut bucket = 0u32;
        while bucket < 64 {
            let (start, size) = Self::bucket_span(n, bucket);
            if size == 0 {
                break;
            }
            let full = 1u128 << bucket;
            total += (weight * u128::from(size) / full).max(1);
            cumulative.push(u64::try_from(total).unwrap_or(u64::MAX));
            weight = weight * u128::from(num) / u128::from(den.max(1));
            bucket += 1;
            if start.saturating_add(size) >= n {
                break;
            }
        }
        Skew { n, cumulative }
    }

    /// First rank and number of ranks of a bucket.
    fn bucket_span(n: u64, bucket: u32) -> (u64, u64) {
        let start = (1u128 << bucket) - 1;
        if start >= u128::from(n) {
            return (n, 0);
        }
        let size = (1u128 << bucket).min(u128::from(n) - start);
        (start as u64, size as u64)
    }

    fn total(&self) -> u64 {
        self.cumulative.last().copied().unwrap_or(0)
    }

    fn sample(&self, r1: u64, r2: u64) -> u64 {
        let x = below(r1, self.total());
        let bucket = self.cumulative.partition_point(|&c| c <= x);
        let (start, size) = Self::bucket_span(self.n, bucket as u32);
        start + below(r2, size)
    }

    /// The probability of one rank, as `(weight of its bucket, total weight, ranks in bucket)`.
    fn share(&self, rank: u64) -> (u64, u64, u64) {
        let bucket = 63 - (rank + 1).leading_zeros();
        let index = bucket as usize;
        let below_weight = if index == 0 {
            0
        } else {
            self.cumulative[index - 1]
        };
        let weight = self.cumulative.get(index).map_or(0, |c| c - below_weight);
        let (_, size) = Self::bucket_span(self.n, bucket);
        (weight, self.total(), size.max(1))
    }
}

/// A bijection of `0..n` (`x -> (a*x + c) mod n`, `gcd(a, n) = 1`) that scatters the popular
/// ranks over the id space, so the heaviest users are not simply users 1, 2, 3.
#[derive(Clone, Debug)]
struct Permutation {
    n: u64,
    a: u64,
    a_inverse: u64,
    c: u64,
}

impl Permutation {
    fn new(n: u64, key_a: u64, key_c: u64) -> Permutation {
        let n = n.max(1);
        let mut a = key_a % n;
        while n > 1 && (a == 0 || gcd(a, n) != 1) {
            a = (a + 1) % n;
        }
        if n == 1 {
            a = 0;
        }
        Permutation {
            n,
            a,
            a_inverse: mod_inverse(a, n),
            c: key_c % n,
        }
    }

    fn apply(&self, x: u64) -> u64 {
        ((u128::from(x) * u128::from(self.a) + u128::from(self.c)) % u128::from(self.n)) as u64
    }

    fn invert(&self, y: u64) -> u64 {
        let shifted =
            (u128::from(y) + u128::from(self.n) - u128::from(self.c)) % u128::from(self.n);
        (shifted * u128::from(self.a_inverse) % u128::from(self.n)) as u64
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// The inverse of `a` modulo `n` (`gcd(a, n) = 1`; `0` when `n == 1`).
fn mod_inverse(a: u64, n: u64) -> u64 {
    let (mut r0, mut r1) = (i128::from(n), i128::from(a));
    let (mut t0, mut t1) = (0i128, 1i128);
    while r1 != 0 {
        let q = r0 / r1;
        (r0, r1) = (r1, r0 - q * r1);
        (t0, t1) = (t1, t0 - q * t1);
    }
    t0.rem_euclid(i128::from(n)) as u64
}

/// The ASCII digits of `v`, right-aligned in a stack buffer: `(buffer, index of first digit)`.
fn digits(mut v: u64) -> ([u8; 20], usize) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            return (buf, i);
        }
    }
}

fn push_u64(out: &mut Vec<u8>, v: u64) {
    let (buf, start) = digits(v);
    out.extend_from_slice(&buf[start..]);
}

fn push_i64(out: &mut Vec<u8>, v: i64) {
    if v < 0 {
        out.push(b'-');
    }
    push_u64(out, v.unsigned_abs());
}

/// `v` in decimal, zero-padded to `width` digits (wider values are written in full).
fn push_padded(out: &mut Vec<u8>, v: u64, width: usize) {
    let (buf, start) = digits(v);
    for _ in buf.len() - start..width {
        out.push(b'0');
    }
    out.extend_from_slice(&buf[start..]);
}

fn push_hex16(out: &mut Vec<u8>, v: u64) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for shift in (0..16).rev() {
        out.push(HEX[((v >> (shift * 4)) & 0xF) as usize]);
    }
}

/// Appends the RFC 3339 form of a UTC time, exactly as
/// [`spendflow_operators::decode::format_event_time`] writes it (milliseconds only when not zero),
/// for times from 1970 to the end of 9999 (others are clamped into that range).
pub(super) fn push_rfc3339(out: &mut Vec<u8>, event_ms: i64) {
    let ms = event_ms.clamp(0, MAX_EVENT_MS);
    let day = ms.div_euclid(MS_PER_DAY);
    let in_day = ms.rem_euclid(MS_PER_DAY) as u64;
    let (year, month, dom) = civil_from_days(day as i32);
    push_padded(out, u64::from(year.unsigned_abs()), 4);
    out.push(b'-');
    push_padded(out, u64::from(month), 2);
    out.push(b'-');
    push_padded(out, u64::from(dom), 2);
    out.push(b'T');
    push_padded(out, in_day / 3_600_000, 2);
    out.push(b':');
    push_padded(out, in_day / 60_000 % 60, 2);
    out.push(b':');
    push_padded(out, in_day / 1000 % 60, 2);
    let millis = in_day % 1000;
    if millis != 0 {
        out.push(b'.');
        push_padded(out, millis, 3);
    }
    out.push(b'Z');
}

/// `s` as a JSON string literal, quotes included: `"` and `\` escaped, control characters as
/// `\u00XX`, everything else (UTF-8 included) as is.
pub(super) fn json_string(s: &str) -> Vec<u8> {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = Vec::with_capacity(s.len() + 2);
    out.push(b'"');
    for &b in s.as_bytes() {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0..=0x1F => {
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(b >> 4)]);
                out.push(HEX[usize::from(b & 0xF)]);
            }
            _ => out.push(b),
        }
    }
    out.push(b'"');
    out
}

/// Lower-case ASCII for e-mail local parts: common accented letters folded, others dropped.
fn ascii_fold(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            'a'..='z' | '0'..='9' => out.push(c),
            'A'..='Z' => out.push(c.to_ascii_lowercase()),
            'á' | 'à' | 'â' | 'ä' | 'å' | 'ã' => out.push('a'),
            'é' | 'è' | 'ê' | 'ë' => out.push('e'),
            'í' | 'ì' | 'î' | 'ï' | 'ı' => out.push('i'),
            'ó' | 'ò' | 'ô' | 'ö' | 'ø' | 'õ' => out.push('o'),
            'ú' | 'ù' | 'û' | 'ü' => out.push('u'),
            'ñ' => out.push('n'),
            'ç' => out.push('c'),
            'ß' => out.push_str("ss"),
            _ => {}
        }
    }
    out
}

/// The card id `c-<user>-<n>`.
fn card_id(user_id: UserId, card: u8) -> String {
    let mut out = Vec::with_capacity(24);
    out.extend_from_slice(b"c-");
    push_u64(&mut out, user_id);
    out.push(b'-');
    push_u64(&mut out, u64::from(card));
    ascii_string(out)
}

/// A `String` from bytes this module wrote, which are ASCII by construction.
fn ascii_string(bytes: Vec<u8>) -> String {
    bytes.into_iter().map(char::from).collect()
}

/// Converts euro cents to minor units of a currency (at least 1 for a positive amount).
fn convert(eur_cents: i64, currency: usize) -> i64 {
    let rate = i128::from(CURRENCIES[currency].minor_per_eur_cent_milli);
    let minor = i128::from(eur_cents) * rate / 1000;
    let minor = i64::try_from(minor).unwrap_or(MAX_ABS_AMOUNT_MINOR);
    minor.clamp(1, MAX_ABS_AMOUNT_MINOR)
}

// ---------------------------------------------------------------------------------------------
// The simulator
// ---------------------------------------------------------------------------------------------

/// A live expense the simulator remembers, compactly (about 40 bytes). Its JSON is a pure
/// function of these fields, so re-encoding it reproduces the bytes last sent for it.
#[derive(Clone, Copy, Debug)]
struct Live {
    serial: u64,
    user_id: UserId,
    event_ms: i64,
    amount_minor: i64,
    merchant: u32,
    category: Category,
    card: u8,
    /// Index into [`CURRENCIES`] (the user's, kept here to save a hash per record).
    currency: u8,
}

/// The per-user facts needed on the hot path.
#[derive(Clone, Copy, Debug)]
struct Traits {
    country: usize,
    currency: usize,
    cards: u8,
}

/// What the next record is meant to be, before falling back when nothing is live yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Intent {
    Malformed,
    Correction,
    Delete,
    Duplicate,
    Refund,
    Late,
}

/// The order of the cumulative thresholds; matches [`GeneratorConfig::rates`].
const INTENTS: [Intent; 6] = [
    Intent::Malformed,
    Intent::Correction,
    Intent::Delete,
    Intent::Duplicate,
    Intent::Refund,
    Intent::Late,
];

/// One in 2^32: rates become thresholds on 32 random bits.
const RATE_ONE: u64 = 1 << 32;

/// The seeded, deterministic expense simulator. See the module docs for the design.
///
/// ```
/// use spendflow_simulator::{GeneratorConfig, Simulator};
///
/// let mut sim = Simulator::new(GeneratorConfig { seed: 7, ..GeneratorConfig::default() })?;
/// for generated in sim.by_ref().take(3) {
///     let decoded = spendflow_operators::decode::decode(&generated.bytes).ok();
///     assert_eq!(decoded, generated.record);
/// }
/// # Ok::<(), spendflow_simulator::ConfigError>(())
/// ```
#[derive(Clone)]
pub struct Simulator {
    config: GeneratorConfig,
    rng: ChaCha8Rng,
    /// Cumulative thresholds out of [`RATE_ONE`], in [`INTENTS`] order.
    thresholds: [u64; 6],
    user_skew: Skew,
    user_permutation: Permutation,
    user_key: u64,
    id_key: u64,
    merchants: Vec<Merchant>,
    /// Each merchant's name as a JSON string literal, escaped once up front.
    merchant_json: Vec<Box<[u8]>>,
    /// Each category's name, shared by every record.
    category_names: [Arc<str>; 11],
    /// Per category: index of its first merchant, and the popularity of its merchants (`None`
    /// when the category has no merchant because there are fewer merchants than categories).
    category_merchants: [(u32, Option<Skew>); 11],
    /// Cumulative shares of the categories that have merchants.
    category_cumulative: Vec<(u64, Category)>,
    /// Mean amount of a new expense in euro cents, for budget calibration.
    mean_eur_cents: u64,
    /// Remembered live expenses, at most `live_window`, in no particular order.
    live: Vec<Live>,
    /// Recent deletes as `(serial, user)`, a ring of at most [`DELETED_WINDOW`].
    deleted: Vec<(u64, UserId)>,
    deleted_next: usize,
    /// Records produced so far.
    produced: u64,
    /// Expense ids handed out so far.
    serials: u64,
}

impl fmt::Debug for Simulator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Simulator")
            .field("config", &self.config)
            .field("merchants", &self.merchants.len())
            .field("live", &self.live.len())
            .field("produced", &self.produced)
            .finish_non_exhaustive()
    }
}

impl Simulator {
    /// Builds a simulator: validates the config, derives every key from the seed and builds the
    /// merchant table. No record is produced yet.
    ///
    /// # Errors
    ///
    /// The config is out of range; see [`GeneratorConfig::validate`].
    pub fn new(config: GeneratorConfig) -> Result<Simulator, ConfigError> {
        config.validate()?;

        let mut thresholds = [0u64; 6];
        let mut cumulative = 0u64;
        for (threshold, (_, rate)) in thresholds.iter_mut().zip(config.rates()) {
            // Exact for 0 and 1; within 2^-32 of the rate otherwise.
            cumulative = (cumulative + (rate * RATE_ONE as f64).round() as u64).min(RATE_ONE);
            *threshold = cumulative;
        }

        let mut keys = SplitMix(config.seed ^ 0x5EED_5EED_5EED_5EED);
        let user_key = keys.next();
        let id_key = keys.next();
        let (perm_a, perm_c) = (keys.next(), keys.next());

        let (merchants, category_merchants) = build_merchants(config.merchants);
        let merchant_json = merchants
            .iter()
            .map(|m| json_string(&m.name).into_boxed_slice())
            .collect();
        let category_names = Category::ALL.map(|c| Arc::<str>::from(c.as_str()));

        let mut category_cumulative = Vec::new();
        let mut total_share = 0u64;
        let mut weighted_mean = 0u64;
        for category in Category::ALL {
            if category_merchants[category as usize].1.is_some() {
                let spec = category.spec();
                total_share += spec.share;
                category_cumulative.push((total_share, category));
                weighted_mean += spec.share * mean_of(&spec.quantiles);
            }
        }
        let mean_eur_cents = weighted_mean / total_share.max(1);

        Ok(Simulator {
            rng: ChaCha8Rng::seed_from_u64(config.seed),
            thresholds,
            user_skew: Skew::new(config.users, USER_SKEW),
            user_permutation: Permutation::new(config.users, perm_a, perm_c),
            user_key,
            id_key,
            merchants,
            merchant_json,
            category_names,
            category_merchants,
            category_cumulative,
            mean_eur_cents,
            live: Vec::new(),
            deleted: Vec::new(),
            deleted_next: 0,
            produced: 0,
            serials: 0,
            config,
        })
    }

    /// The configuration the simulator runs with.
    pub fn config(&self) -> &GeneratorConfig {
        &self.config
    }

    /// Every merchant, grouped by category, most popular first within a category.
    pub fn merchants(&self) -> &[Merchant] {
        &self.merchants
    }

    /// How many records [`Simulator::next_record`] has produced.
    pub fn produced(&self) -> u64 {
        self.produced
    }

    /// How many live expenses are remembered as targets (at most `live_window`).
    pub fn remembered(&self) -> usize {
        self.live.len()
    }

    /// The stream time of the next record: `start_ms + produced * ms_per_event`, capped at the
    /// end of year 9999. New records get an event time in
    /// `stream_ms .. stream_ms + ms_per_event`; late ones up to `late_max_ms` before it.
    pub fn stream_ms(&self) -> i64 {
        let step = i64::try_from(self.produced)
            .unwrap_or(i64::MAX)
            .saturating_mul(self.config.ms_per_event);
        self.config.start_ms.saturating_add(step).min(MAX_EVENT_MS)
    }

    /// The profile of a user, a pure function of `(seed, user_id)`; `None` when the id is not in
    /// `1..=users`.
    pub fn user(&self, user_id: UserId) -> Option<UserProfile> {
        if user_id == 0 || user_id > self.config.users {
            return None;
        }
        let (traits, mut h) = self.traits_and_stream(user_id);
        let first = FIRST_NAMES[below(h.next(), FIRST_NAMES.len() as u64) as usize];
        let last = LAST_NAMES[below(h.next(), LAST_NAMES.len() as u64) as usize];
        let domain = EMAIL_DOMAINS[below(h.next(), EMAIL_DOMAINS.len() as u64) as usize];
        let budget_percent = 60 + below(h.next(), 101);
        Some(UserProfile {
            user_id,
            name: format!("{first} {last}"),
            email: format!(
                "{}.{}.{user_id}@{domain}",
                ascii_fold(first),
                ascii_fold(last)
            ),
            country: COUNTRIES[traits.country].0.to_string(),
            currency: ascii_string(CURRENCIES[traits.currency].code.to_vec()),
            monthly_budget_minor: self.budget(user_id, traits.currency, budget_percent),
            cards: (1..=traits.cards).map(|n| card_id(user_id, n)).collect(),
        })
    }

    /// Produces the next record. The stream is infinite; take as many as needed.
    pub fn next_record(&mut self) -> Generated {
        let now = self.stream_ms();
        self.produced += 1;
        let roll = self.rng.next_u64() >> 32;
        let intent = self
            .thresholds
            .iter()
            .position(|&t| roll < t)
            .map(|i| INTENTS[i]);
        match intent {
            Some(Intent::Malformed) => self.malformed(now),
            Some(Intent::Correction) => self.correction(now),
            Some(Intent::Delete) => self.delete(now),
            Some(Intent::Duplicate) => self.duplicate(now),
            Some(Intent::Refund) => self.refund(now),
            Some(Intent::Late) => {
                let lateness = 1 + below(self.rng.next_u64(), self.config.late_max_ms as u64);
                let event_ms = now.saturating_sub(lateness as i64).max(0);
                self.fresh(event_ms, GeneratedKind::Late)
            }
            None => self.fresh_now(now),
        }
    }

    // --- record kinds ----------------------------------------------------------------------

    fn fresh_now(&mut self, now: i64) -> Generated {
        let event_ms = self.jitter(now);
        self.fresh(event_ms, GeneratedKind::New)
    }

    /// A new expense, remembered as live.
    fn fresh(&mut self, event_ms: i64, kind: GeneratedKind) -> Generated {
        let live = self.new_live(event_ms);
        self.remember(live);
        self.upsert(&live, kind)
    }

    fn correction(&mut self, now: i64) -> Generated {
        let Some(index) = self.pick_live() else {
            return self.fresh_now(now);
        };
        let mut live = self.live[index];
        let old = live.amount_minor.unsigned_abs();
        let percent = 50 + below(self.rng.next_u64(), 101);
        let mut new = (u128::from(old) * u128::from(percent) / 100) as u64;
        new = new.clamp(1, MAX_ABS_AMOUNT_MINOR as u64);
        if new == old {
            new = if old < MAX_ABS_AMOUNT_MINOR as u64 {
                old + 1
            } else {
                old - 1
            };
        }
        let new = new as i64;
        live.amount_minor = if live.amount_minor < 0 { -new } else { new };
        let what = below(self.rng.next_u64(), 100);
        if what < 15 {
            // Booked at the wrong merchant: move it (the category follows the merchant).
            let category = self.sample_category();
            live.merchant = self.sample_merchant(category);
            live.category = category;
        } else if what < 25 {
            // Recategorised by the issuer: same merchant, another category.
            let others = Category::ALL.len() as u64 - 1;
            let mut index = below(self.rng.next_u64(), others) as usize;
            if index >= live.category as usize {
                index += 1;
            }
            live.category = Category::ALL[index];
        }
        self.live[index] = live;
        self.upsert(&live, GeneratedKind::Correction)
    }

    fn delete(&mut self, now: i64) -> Generated {
        let Some(index) = self.pick_live() else {
            return self.fresh_now(now);
        };
        let live = self.live.swap_remove(index);
        if self.deleted.len() < DELETED_WINDOW {
            self.deleted.push((live.serial, live.user_id));
        } else {
            self.deleted[self.deleted_next] = (live.serial, live.user_id);
        }
        self.deleted_next = (self.deleted_next + 1) % DELETED_WINDOW;
        self.delete_record(live.serial, live.user_id, GeneratedKind::Delete)
    }

    fn duplicate(&mut self, now: i64) -> Generated {
        let of_delete = below(self.rng.next_u64(), 10) < DUPLICATE_DELETE_TENTHS;
        if of_delete && !self.deleted.is_empty() {
            let (serial, user_id) =
                self.deleted[below(self.rng.next_u64(), self.deleted.len() as u64) as usize];
            return self.delete_record(serial, user_id, GeneratedKind::Duplicate);
        }
        let Some(index) = self.pick_live() else {
            return self.fresh_now(now);
        };
        let live = self.live[index];
        self.upsert(&live, GeneratedKind::Duplicate)
    }

    fn refund(&mut self, now: i64) -> Generated {
        let Some(index) = self.pick_live() else {
            return self.fresh_now(now);
        };
        let original = self.live[index];
        if original.amount_minor <= 0 {
            // Refunds of refunds make no sense; spend instead.
            return self.fresh_now(now);
        }
        let full = original.amount_minor;
        let amount = if below(self.rng.next_u64(), 10) < 6 {
            full
        } else {
            let percent = 10 + below(self.rng.next_u64(), 81) as i64;
            (full * percent / 100).max(1)
        };
        let live = Live {
            serial: self.next_serial(),
            event_ms: self.jitter(now),
            amount_minor: -amount,
            ..original
        };
        self.remember(live);
        self.upsert(&live, GeneratedKind::Refund)
    }

    fn malformed(&mut self, now: i64) -> Generated {
        let event_ms = self.jitter(now);
        let live = self.new_live(event_ms);
        let which = below(self.rng.next_u64(), MALFORMED_KINDS.len() as u64) as usize;
        let label = MALFORMED_KINDS[which];
        let r = self.rng.next_u64();
        let bytes = self.corrupt(&live, label, r);
        Generated {
            user_id: live.user_id,
            kind: GeneratedKind::Malformed(label),
            bytes,
            record: None,
        }
    }

    // --- sampling ----------------------------------------------------------------------------

    fn next_serial(&mut self) -> u64 {
        let serial = self.serials;
        self.serials += 1;
        serial
    }

    fn jitter(&mut self, now: i64) -> i64 {
        let step = self.config.ms_per_event as u64;
        let offset = below(self.rng.next_u64(), step) as i64;
        now.saturating_add(offset).min(MAX_EVENT_MS)
    }

    fn new_live(&mut self, event_ms: i64) -> Live {
        let rank = self
            .user_skew
            .sample(self.rng.next_u64(), self.rng.next_u64());
        let user_id = self.user_permutation.apply(rank) + 1;
        let traits = self.traits(user_id);
        let category = self.sample_category();
        let merchant = self.sample_merchant(category);
        let amount_minor = self.sample_amount(category, traits.currency);
        let card = if traits.cards == 1 || below(self.rng.next_u64(), 100) < 65 {
            1
        } else {
            2 + below(self.rng.next_u64(), u64::from(traits.cards) - 1) as u8
        };
        Live {
            serial: self.next_serial(),
            user_id,
            event_ms,
            amount_minor,
            merchant,
            category,
            card,
            currency: traits.currency as u8,
        }
    }

    fn sample_category(&mut self) -> Category {
        let total = self.category_cumulative.last().map_or(0, |&(c, _)| c);
        let x = below(self.rng.next_u64(), total);
        let index = self.category_cumulative.partition_point(|&(c, _)| c <= x);
        self.category_cumulative
            .get(index)
            .map_or(Category::Groceries, |&(_, c)| c)
    }

    fn sample_merchant(&mut self, category: Category) -> u32 {
        let (r1, r2) = (self.rng.next_u64(), self.rng.next_u64());
        match &self.category_merchants[category as usize] {
            (start, Some(skew)) => start + skew.sample(r1, r2) as u32,
            // Not reached: only categories with merchants are sampled.
            (_, None) => 0,
        }
    }

    fn sample_amount(&mut self, category: Category, currency: usize) -> i64 {
        let q = &category.spec().quantiles;
        let segment = below(self.rng.next_u64(), 10) as usize;
        let (low, high) = (q[segment], q[segment + 1]);
        let eur_cents = low + below(self.rng.next_u64(), (high - low + 1) as u64) as i64;
        convert(eur_cents, currency)
    }

    fn remember(&mut self, live: Live) {
        if self.live.len() < self.config.live_window {
            self.live.push(live);
        } else {
            // Random replacement: an entry survives each newer expense with probability
            // 1 - 1/window, so the window holds a sample that favours recent expenses.
            let index = below(self.rng.next_u64(), self.live.len() as u64) as usize;
            self.live[index] = live;
        }
    }

    fn pick_live(&mut self) -> Option<usize> {
        if self.live.is_empty() {
            return None;
        }
        Some(below(self.rng.next_u64(), self.live.len() as u64) as usize)
    }

    /// The per-user stream and the facts drawn first from it.
    fn traits_and_stream(&self, user_id: UserId) -> (Traits, SplitMix) {
        let mut h = SplitMix(self.user_key ^ mix(user_id));
        let country_roll = below(h.next(), 100);
        let mut country = 0;
        let mut cumulative = 0;
        for (index, &(_, _, percent)) in COUNTRIES.iter().enumerate() {
            cumulative += percent;
            if country_roll < cumulative {
                country = index;
                break;
            }
        }
        let card_roll = below(h.next(), 100);
        let cards = match card_roll {
            0..50 => 1,
            50..85 => 2,
            _ => 3,
        };
        (
            Traits {
                country,
                currency: COUNTRIES[country].1,
                cards,
            },
            h,
        )
    }

    fn traits(&self, user_id: UserId) -> Traits {
        self.traits_and_stream(user_id).0
    }

    /// A monthly budget near the user's expected monthly spending: expected new expenses per
    /// month at the configured pace, times the user's share of them, times the mean amount, times
    /// `percent` / 100; at least 100 euros' worth, rounded up to 1000 minor units.
    fn budget(&self, user_id: UserId, currency: usize, percent: u64) -> i64 {
        let rank = self.user_permutation.invert(user_id - 1);
        let (weight, total, size) = self.user_skew.share(rank);
        let per_month = u128::from(30 * MS_PER_DAY as u64 / self.config.ms_per_event.max(1) as u64);
        // New and late expenses are the spending: everything above the refund threshold.
        let spending_share = RATE_ONE - self.thresholds[4];
        let mut cents = (per_month * u128::from(spending_share)) >> 32;
        cents *= u128::from(self.mean_eur_cents);
        cents = cents * u128::from(weight) / u128::from(total.max(1)) / u128::from(size);
        cents = cents * u128::from(percent) / 100;
        let eur_cents = i64::try_from(cents)
            .unwrap_or(MAX_ABS_AMOUNT_MINOR)
            .max(10_000);
        let minor = convert(eur_cents, currency);
        let rounded = minor
            .div_euclid(1000)
            .saturating_add(1)
            .saturating_mul(1000);
        rounded.min(MAX_ABS_AMOUNT_MINOR)
    }

    // --- encoding ----------------------------------------------------------------------------

    fn expense_hex(&self, serial: u64) -> u64 {
        // A bijection of the serial: ids are unique, yet look random.
        mix(serial ^ self.id_key)
    }

    fn expense_id(&self, serial: u64) -> ExpenseId {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let hex = self.expense_hex(serial);
        let mut out = [0u8; 18];
        out[..2].copy_from_slice(b"e-");
        for (i, b) in out[2..].iter_mut().enumerate() {
            *b = HEX[((hex >> ((15 - i) * 4)) & 0xF) as usize];
        }
        // 18 ASCII bytes: always a valid id.
        ExpenseId::new(std::str::from_utf8(&out).expect("ASCII")).expect("18 bytes fit")
    }

    fn upsert(&self, live: &Live, kind: GeneratedKind) -> Generated {
        let currency = CURRENCIES[usize::from(live.currency)].code;
        let mut bytes = Vec::with_capacity(256);
        self.write_upsert(&mut bytes, live, currency);
        let expense = Expense {
            expense_id: self.expense_id(live.serial),
            user_id: live.user_id,
            card_id: Some(card_id(live.user_id, live.card)),
            merchant: Arc::clone(&self.merchants[live.merchant as usize].name),
            category: Arc::clone(&self.category_names[live.category as usize]),
            amount_minor: live.amount_minor,
            currency,
            event_ms: live.event_ms,
        };
        Generated {
            user_id: live.user_id,
            kind,
            bytes,
            record: Some(Record::Upsert(expense)),
        }
    }

    fn delete_record(&self, serial: u64, user_id: UserId, kind: GeneratedKind) -> Generated {
        let mut bytes = Vec::with_capacity(64);
        bytes.extend_from_slice(b"{\"expense_id\":\"e-");
        push_hex16(&mut bytes, self.expense_hex(serial));
        bytes.extend_from_slice(b"\",\"user_id\":");
        push_u64(&mut bytes, user_id);
        bytes.extend_from_slice(b",\"op\":\"delete\"}");
        let record = Record::Delete {
            expense_id: self.expense_id(serial),
            user_id,
        };
        Generated {
            user_id,
            kind,
            bytes,
            record: Some(record),
        }
    }

    /// The hot path: one upsert as JSON v1, fields in the contract's order.
    fn write_upsert(&self, out: &mut Vec<u8>, live: &Live, currency: [u8; 3]) {
        out.extend_from_slice(b"{\"expense_id\":\"e-");
        push_hex16(out, self.expense_hex(live.serial));
        out.extend_from_slice(b"\",\"user_id\":");
        push_u64(out, live.user_id);
        out.extend_from_slice(b",\"card_id\":\"c-");
        push_u64(out, live.user_id);
        out.push(b'-');
        push_u64(out, u64::from(live.card));
        out.extend_from_slice(b"\",\"merchant\":");
        out.extend_from_slice(&self.merchant_json[live.merchant as usize]);
        out.extend_from_slice(b",\"category\":\"");
        out.extend_from_slice(live.category.as_str().as_bytes());
        out.extend_from_slice(b"\",\"amount_minor\":");
        push_i64(out, live.amount_minor);
        out.extend_from_slice(b",\"currency\":\"");
        out.extend_from_slice(&currency);
        out.extend_from_slice(b"\",\"event_time\":\"");
        push_rfc3339(out, live.event_ms);
        out.extend_from_slice(b"\",\"op\":\"upsert\"}");
    }

    /// The same upsert as `(field, raw JSON value)` pairs, for the malformed records to edit.
    /// Joined with [`join_fields`] it is byte-identical to [`Simulator::write_upsert`].
    fn upsert_fields(&self, live: &Live) -> Vec<(&'static str, Vec<u8>)> {
        let currency = CURRENCIES[usize::from(live.currency)].code;
        let quoted = |s: &[u8]| [b"\"", s, b"\""].concat();
        let mut amount = Vec::new();
        push_i64(&mut amount, live.amount_minor);
        let mut time = Vec::new();
        push_rfc3339(&mut time, live.event_ms);
        vec![
            (
                "expense_id",
                quoted(self.expense_id(live.serial).as_bytes()),
            ),
            ("user_id", live.user_id.to_string().into_bytes()),
            (
                "card_id",
                quoted(card_id(live.user_id, live.card).as_bytes()),
            ),
            (
                "merchant",
                self.merchant_json[live.merchant as usize].to_vec(),
            ),
            ("category", quoted(live.category.as_str().as_bytes())),
            ("amount_minor", amount),
            ("currency", quoted(&currency)),
            ("event_time", quoted(&time)),
            ("op", b"\"upsert\"".to_vec()),
        ]
    }

    /// A broken version of an upsert; `label` is one of [`MALFORMED_KINDS`], `r` picks the
    /// variant of the damage.
    fn corrupt(&self, live: &Live, label: &str, r: u64) -> Vec<u8> {
        let mut fields = self.upsert_fields(live);
        let set = |fields: &mut Vec<(&'static str, Vec<u8>)>, key: &str, value: Vec<u8>| {
            if let Some(field) = fields.iter_mut().find(|(k, _)| *k == key) {
                field.1 = value;
            }
        };
        let pick = |options: &[&str]| {
            options[below(r, options.len() as u64) as usize]
                .as_bytes()
                .to_vec()
        };
        let valid = join_fields(&fields);
        let abs = live.amount_minor.unsigned_abs();
        let sign = if live.amount_minor < 0 { "-" } else { "" };
        match label {
            "truncated_json" => {
                let mut bytes = valid;
                let cut = 1 + below(r, bytes.len() as u64 - 1) as usize;
                bytes.truncate(cut);
                return bytes;
            }
            "float_amount" => {
                let text = if r.is_multiple_of(5) {
                    format!("{}e0", live.amount_minor)
                } else {
                    format!("{sign}{}.{:02}", abs / 100, abs % 100)
                };
                set(&mut fields, "amount_minor", text.into_bytes());
            }
            "missing_field" => {
                const REQUIRED: [&str; 7] = [
                    "expense_id",
                    "user_id",
                    "merchant",
                    "category",
                    "amount_minor",
                    "currency",
                    "event_time",
                ];
                let key = REQUIRED[below(r, REQUIRED.len() as u64) as usize];
                if r.is_multiple_of(3) {
                    set(&mut fields, key, b"null".to_vec());
                } else {
                    fields.retain(|(k, _)| *k != key);
                }
            }
            "bad_currency" => {
                let value = pick(&[
                    "\"eur\"", "\"EURO\"", "\"E1R\"", "\"\"", "\"€\"", "\"US\"", "978",
                ]);
                set(&mut fields, "currency", value);
            }
            "unknown_op" => {
                let value = pick(&[
                    "\"update\"",
                    "\"UPSERT\"",
                    "\"insert\"",
                    "\"remove\"",
                    "\"\"",
                ]);
                set(&mut fields, "op", value);
            }
            "bad_timestamp" => {
                let mut time = Vec::new();
                push_rfc3339(&mut time, live.event_ms);
                let value = match r % 8 {
                    // The right time without its offset.
                    0 => [b"\"", &time[..time.len() - 1], b"\""].concat(),
                    1 => b"\"2026-13-01T00:00:00Z\"".to_vec(),
                    2 => b"\"2026-02-30T10:00:00Z\"".to_vec(),
                    3 => b"\"2026-11-24T25:00:00Z\"".to_vec(),
                    4 => b"\"24/11/2026 10:15\"".to_vec(),
                    5 => b"\"yesterday\"".to_vec(),
                    6 => b"\"\"".to_vec(),
                    // Epoch milliseconds as a number.
                    _ => live.event_ms.to_string().into_bytes(),
                };
                set(&mut fields, "event_time", value);
            }
            "amount_out_of_range" => {
                let excess =
                    MAX_ABS_AMOUNT_MINOR as u64 + 1 + below(r, MAX_ABS_AMOUNT_MINOR as u64);
                let value = match r % 4 {
                    0 => "99999999999999999999".to_string(),
                    1 => format!("-{excess}"),
                    _ => excess.to_string(),
                };
                set(&mut fields, "amount_minor", value.into_bytes());
            }
            "not_an_object" => {
                return match r % 5 {
                    0 => [b"[", valid.as_slice(), b"]"].concat(),
                    1 => fields.swap_remove(0).1,
                    2 => live.amount_minor.to_string().into_bytes(),
                    3 => b"null".to_vec(),
                    _ => b"true".to_vec(),
                };
            }
            "invalid_utf8" => {
                const BAD: [&[u8]; 4] = [b"\xFF", b"\xC3\x28", b"\xED\xA0\x80", b"\x80"];
                let bad = BAD[below(r, BAD.len() as u64) as usize];
                let name = self.merchant_json[live.merchant as usize].as_ref();
                // After the opening quote, before the rest of the (escaped) name.
                let value = [&name[..1], bad, &name[1..]].concat();
                set(&mut fields, "merchant", value);
            }
            "user_id_zero" => set(&mut fields, "user_id", b"0".to_vec()),
            "wrong_type" => match r % 4 {
                0 => set(
                    &mut fields,
                    "amount_minor",
                    format!("\"{}\"", live.amount_minor).into_bytes(),
                ),
                1 => set(
                    &mut fields,
                    "user_id",
                    format!("\"{}\"", live.user_id).into_bytes(),
                ),
                2 => set(&mut fields, "merchant", b"42".to_vec()),
                _ => set(&mut fields, "expense_id", b"{\"id\":1}".to_vec()),
            },
            "concatenated" => {
                let mut bytes = valid.clone();
                bytes.extend_from_slice(&valid);
                return bytes;
            }
            "duplicate_field" => {
                let mut again = Vec::new();
                push_i64(&mut again, live.amount_minor.saturating_add(100));
                fields.push(("amount_minor", again));
            }
            _ => {}
        }
        join_fields(&fields)
    }
}

impl Iterator for Simulator {
    type Item = Generated;

    /// Always `Some`: the stream is infinite.
    fn next(&mut self) -> Option<Generated> {
        Some(self.next_record())
    }
}

/// `{"k":v,...}` from raw JSON values.
fn join_fields(fields: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.push(b'{');
    for (i, (key, value)) in fields.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.push(b'"');
        out.extend_from_slice(key.as_bytes());
        out.extend_from_slice(b"\":");
        out.extend_from_slice(value);
    }
    out.push(b'}');
    out
}

/// The mean of a quantile table's distribution (the mean of its segments' midpoints).
fn mean_of(quantiles: &[i64; 11]) -> u64 {
    let sum: i64 = quantiles.windows(2).map(|w| w[0] + w[1]).sum();
    (sum / 20).max(0) as u64
}

/// The merchant table: `merchants` split over the categories in proportion to their shares
/// (every category gets one first when there are enough), named from the built-in lists, with
/// city and then number suffixes once a list runs out.
fn build_merchants(merchants: u32) -> (Vec<Merchant>, [(u32, Option<Skew>); 11]) {
    let n = Category::ALL.len();
    let mut counts = [0u32; 11];
    if (merchants as usize) < n {
        for count in counts.iter_mut().take(merchants as usize) {
            *count = 1;
        }
    } else {
        // One each, the rest by largest remainder (ties to the more frequent category).
        let rest = u64::from(merchants) - n as u64;
        let mut remainders = Vec::with_capacity(n);
        let mut given = 0u64;
        for (i, category) in Category::ALL.iter().enumerate() {
            let exact = rest * category.spec().share;
            counts[i] = 1 + (exact / 1000) as u32;
            given += exact / 1000;
            remainders.push((exact % 1000, i));
        }
        remainders.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        for &(_, i) in remainders.iter().take((rest - given) as usize) {
            counts[i] += 1;
        }
    }

    let mut table = Vec::with_capacity(merchants as usize);
    let mut spans: [(u32, Option<Skew>); 11] = Default::default();
    for (i, category) in Category::ALL.into_iter().enumerate() {
        let start = table.len() as u32;
        let names = category.spec().names;
        for j in 0..counts[i] as usize {
            let base = names[j % names.len()];
            let round = j / names.len();
            let name = if round == 0 {
                base.to_string()
            } else {
                let city = CITIES[(round - 1) % CITIES.len()];
                match (round - 1) / CITIES.len() {
                    0 => format!("{base} {city}"),
                    generation => format!("{base} {city} {}", generation + 1),
                }
            };
            table.push(Merchant {
                name: Arc::from(name),
                category,
            });
        }
        if counts[i] > 0 {
            spans[i] = (start, Some(Skew::new(u64::from(counts[i]), MERCHANT_SKEW)));
        }
    }
    (table, spans)
}

#[cfg(test)]
pub(super) mod testing {
    //! Internals the unit tests look at.

    use super::*;

    /// Whether [`Simulator::write_upsert`] and the field list agree for a fresh expense.
    pub fn writers_agree(sim: &mut Simulator) -> bool {
        let live = sim.new_live(sim.stream_ms());
        let mut fast = Vec::new();
        let currency = CURRENCIES[usize::from(live.currency)].code;
        sim.write_upsert(&mut fast, &live, currency);
        fast == join_fields(&sim.upsert_fields(&live))
    }

    /// Samples `draws` ranks from a skew over `n` with the user ratio.
    pub fn user_skew_ranks(n: u64, draws: usize, seed: u64) -> Vec<u64> {
        let skew = Skew::new(n, USER_SKEW);
        let mut h = SplitMix(seed);
        (0..draws)
            .map(|_| skew.sample(h.next(), h.next()))
            .collect()
    }

    /// Applies and inverts a permutation over `n` for every element (small `n` only).
    pub fn permutation_is_bijective(n: u64, key: u64) -> bool {
        let p = Permutation::new(n, mix(key), mix(key + 1));
        let mut seen = vec![false; n as usize];
        for x in 0..n {
            let y = p.apply(x);
            if y >= n || seen[y as usize] || p.invert(y) != x {
                return false;
            }
            seen[y as usize] = true;
        }
        true
    }
}
