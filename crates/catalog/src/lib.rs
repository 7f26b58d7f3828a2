//! The product catalog: products (id, name, category, price, optional brand, availability
//! and popularity prior) as every RetargetIQ service knows them.
//!
//! A [`Catalog`] is data: the services build theirs from the compacted `catalog-topic` and
//! follow its changes live (`kit::catalog`). The products a shop sends are opaque ids with
//! any categories. [`Catalog::demo`] is the generated demo catalog (2,400 products `P00001`..
//! `P02400` in eight categories, the same in every process) that `retargetiq up` loads into an
//! empty topic, and that the simulator and the offline evaluations use.

// Looked up for every candidate of every list: a fast hash, seeded per process.
use foldhash::HashMap;
use std::sync::{LazyLock, OnceLock};

use serde::Serialize;

/// Number of products in the demo catalog.
pub const PRODUCT_COUNT: usize = 2_400;

/// A product as every service knows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Product {
    pub id: String,
    pub name: String,
    pub category: String,
    pub price: f64,
    pub brand: Option<String>,
    /// False once the shop withdrew it: still known (for enrichment), never recommended.
    pub available: bool,
    /// Prior popularity in `[0, 1]` when the shop gives one (the demo catalog's is Zipf-like
    /// within each category), else 0: live popularity takes over.
    pub popularity: f64,
}

/// What an update did to a catalog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Added,
    Updated,
    Unchanged,
}

/// A category with the words its product names are made of and its price range.
struct CategorySpec {
    id: &'static str,
    adjectives: &'static [&'static str],
    nouns: &'static [&'static str],
    price_range: (f64, f64),
}

const CATEGORIES: &[CategorySpec] = &[
    CategorySpec {
        id: "electronics",
        adjectives: &["Wireless", "Smart", "Compact", "Noise-Cancelling", "4K", "Portable"],
        nouns: &["Headphones", "Speaker", "Monitor", "Camera", "Charger", "Tablet"],
        price_range: (19.0, 899.0),
    },
    CategorySpec {
        id: "books",
        adjectives: &["Illustrated", "Classic", "Modern", "Complete", "Pocket", "Annotated"],
        nouns: &["Novel", "Cookbook", "Atlas", "Biography", "Anthology", "Guide"],
        price_range: (6.0, 59.0),
    },
    CategorySpec {
        id: "fashion",
        adjectives: &["Linen", "Denim", "Wool", "Slim-Fit", "Vintage", "Organic"],
        nouns: &["Jacket", "Shirt", "Dress", "Scarf", "Jeans", "Sweater"],
        price_range: (12.0, 249.0),
    },
    CategorySpec {
        id: "home",
        adjectives: &["Ceramic", "Oak", "Minimalist", "Cozy", "Handmade", "Nordic"],
        nouns: &["Lamp", "Vase", "Rug", "Armchair", "Shelf", "Blanket"],
        price_range: (9.0, 499.0),
    },
    CategorySpec {
        id: "sports",
        adjectives: &["Trail", "Pro", "Lightweight", "Waterproof", "Carbon", "Training"],
        nouns: &["Running Shoes", "Yoga Mat", "Bike Helmet", "Backpack", "Racket", "Dumbbells"],
        price_range: (15.0, 349.0),
    },
    CategorySpec {
        id: "beauty",
        adjectives: &["Hydrating", "Natural", "Vitamin C", "Matte", "Gentle", "Overnight"],
        nouns: &["Serum", "Cleanser", "Lipstick", "Moisturizer", "Shampoo", "Sunscreen"],
        price_range: (5.0, 89.0),
    },
    CategorySpec {
        id: "toys",
        adjectives: &["Wooden", "Magnetic", "Glow-in-the-Dark", "Educational", "Giant", "Mini"],
        nouns: &["Puzzle", "Building Set", "Robot", "Board Game", "Plush Bear", "Train Set"],
        price_range: (7.0, 129.0),
    },
    CategorySpec {
        id: "grocery",
        adjectives: &["Organic", "Single-Origin", "Spicy", "Gluten-Free", "Roasted", "Artisan"],
        nouns: &["Coffee Beans", "Olive Oil", "Tea", "Granola", "Chocolate", "Pasta"],
        price_range: (3.0, 45.0),
    },
];

/// A catalog: products by id, by category and by popularity. Products are kept in the order
/// they first arrived (so iteration is deterministic); an update replaces a product in place.
#[derive(Debug, Default)]
pub struct Catalog {
    products: Vec<Product>,
    by_id: HashMap<String, usize>,
    /// Built on first use after a change.
    index: OnceLock<Index>,
}

/// The orders the readers ask for, over available products only.
#[derive(Debug, Default)]
struct Index {
    /// Unique in the process: see [`Catalog::revision`].
    revision: u64,
    /// Categories in order of first appearance.
    categories: Vec<String>,
    /// Per category, most popular (by prior) first, ties by id.
    by_category: HashMap<String, Vec<usize>>,
    /// All available products, most popular first, ties by id.
    by_popularity: Vec<usize>,
}

static DEMO: LazyLock<Catalog> = LazyLock::new(|| Catalog::generate(0x5EED_CA7A_1060));

/// A small, deterministic pseudo-random generator (SplitMix64), so the catalog is identical
/// in every process and on every platform, whatever version of `rand` is in use.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A float in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[(self.next() % items.len() as u64) as usize]
    }
}

impl Catalog {
    /// The generated demo catalog.
    pub fn demo() -> &'static Catalog {
        &DEMO
    }

    /// A catalog of `products` (later duplicates of an id replace earlier ones).
    pub fn from_products(products: impl IntoIterator<Item = Product>) -> Self {
        let mut c = Self::default();
        for p in products {
            c.upsert(p);
        }
        c
    }

    fn generate(seed: u64) -> Self {
        let mut rng = SplitMix64(seed);
        let per_category = PRODUCT_COUNT / CATEGORIES.len();
        let mut products = Vec::with_capacity(PRODUCT_COUNT);
        for (c, spec) in CATEGORIES.iter().enumerate() {
            for rank in 0..per_category {
                let n = products.len() + 1;
                let (lo, hi) = spec.price_range;
                // Log-uniform prices: many cheap items, a few expensive ones.
                let price = (lo * (hi / lo).powf(rng.unit()) * 100.0).round() / 100.0;
                let name = format!(
                    "{} {} {}",
                    rng.pick(spec.adjectives),
                    rng.pick(spec.nouns),
                    ["", "II", "Plus", "Max", "Lite", "S", "Pro", "XL"][(n + c) % 8]
                )
                .trim_end()
                .to_owned();
                products.push(Product {
                    id: format!("P{n:05}"),
                    name,
                    category: spec.id.to_owned(),
                    price,
                    brand: None,
                    available: true,
                    // Zipf prior within the category (rank 0 is the best seller).
                    popularity: 1.0 / (rank as f64 + 1.0).powf(0.8),
                });
            }
        }
        Self::from_products(products)
    }

    /// Adds `product`, or replaces the product with its id.
    pub fn upsert(&mut self, product: Product) -> Change {
        match self.by_id.get(&product.id) {
            Some(&i) if self.products[i] == product => Change::Unchanged,
            Some(&i) => {
                self.products[i] = product;
                self.index = OnceLock::new();
                Change::Updated
            }
            None => {
                self.by_id.insert(product.id.clone(), self.products.len());
                self.products.push(product);
                self.index = OnceLock::new();
                Change::Added
            }
        }
    }

    /// The product with this id, available or not.
    pub fn get(&self, id: &str) -> Option<&Product> {
        self.by_id.get(id).map(|&i| &self.products[i])
    }

    /// The product with this id if it may be recommended.
    pub fn available(&self, id: &str) -> Option<&Product> {
        self.get(id).filter(|p| p.available)
    }

    /// Every product, available or not, in order of first arrival.
    pub fn products(&self) -> &[Product] {
        &self.products
    }

    pub fn len(&self) -> usize {
        self.products.len()
    }

    pub fn is_empty(&self) -> bool {
        self.products.is_empty()
    }

    fn index(&self) -> &Index {
        self.index.get_or_init(|| {
            static REVISIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
            let mut index =
                Index { revision: REVISIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed), ..Index::default() };
            for (i, p) in self.products.iter().enumerate().filter(|(_, p)| p.available) {
                if !index.by_category.contains_key(&p.category) {
                    index.categories.push(p.category.clone());
                }
                index.by_category.entry(p.category.clone()).or_default().push(i);
                index.by_popularity.push(i);
            }
            let products = &self.products;
            let order = |a: &usize, b: &usize| {
                products[*b]
                    .popularity
                    .total_cmp(&products[*a].popularity)
                    .then_with(|| products[*a].id.cmp(&products[*b].id))
            };
            index.by_category.values_mut().for_each(|v| v.sort_by(order));
            index.by_popularity.sort_by(order);
            index
        })
    }

    /// A number that changes whenever the catalog does and that no other catalog of this
    /// process has had: what is derived from a catalog can be kept while this stays the same.
    pub fn revision(&self) -> u64 {
        self.index().revision
    }

    /// Categories with available products, in order of first appearance.
    pub fn categories(&self) -> impl Iterator<Item = &str> {
        self.index().categories.iter().map(String::as_str)
    }

    pub fn is_category(&self, id: &str) -> bool {
        self.index().by_category.contains_key(id)
    }

    /// The available products of a category, best sellers (by prior popularity) first.
    pub fn in_category(&self, category: &str) -> impl Iterator<Item = &Product> {
        self.index().by_category.get(category).into_iter().flatten().map(|&i| &self.products[i])
    }

    /// All available products, most popular by prior first, across categories (cold-start
    /// fallback).
    pub fn by_popularity(&self) -> impl Iterator<Item = &Product> {
        self.index().by_popularity.iter().map(|&i| &self.products[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalog_is_deterministic_and_complete() {
        let a = Catalog::generate(0x5EED_CA7A_1060);
        let b = Catalog::demo();
        assert_eq!(a.products(), b.products());
        assert_eq!(b.products().len(), PRODUCT_COUNT);
        assert_eq!(b.categories().count(), CATEGORIES.len());
        for p in b.products() {
            assert!(p.price > 0.0 && p.price.is_finite(), "{p:?}");
            assert_eq!(b.get(&p.id), Some(p));
            assert!(b.is_category(&p.category));
        }
    }

    #[test]
    fn category_lookup_and_popularity() {
        let c = Catalog::demo();
        let books: Vec<_> = c.in_category("books").collect();
        assert_eq!(books.len(), PRODUCT_COUNT / CATEGORIES.len());
        assert!(books.iter().all(|p| p.category == "books"));
        assert!(books[0].popularity > books[10].popularity);
        assert_eq!(c.in_category("nope").count(), 0);
        assert!(c.get("P99999").is_none());
        let top: Vec<_> = c.by_popularity().take(8).collect();
        assert_eq!(top.len(), 8);
        assert!(top.iter().all(|p| (p.popularity - 1.0).abs() < 1e-12));
    }

    #[test]
    fn updates_change_the_product_and_its_orders() {
        let mut c = Catalog::from_products(Catalog::demo().products()[..3].to_vec());
        let twin = Catalog::from_products(Catalog::demo().products()[..3].to_vec());
        assert_ne!(c.revision(), twin.revision(), "two catalogs never share a revision");
        let first = c.products()[0].clone();
        let before = c.revision();
        assert_eq!(c.upsert(first.clone()), Change::Unchanged);
        assert_eq!(c.revision(), before, "no change, same revision");
        let cheaper = Product { price: 1.0, ..first.clone() };
        assert_eq!(c.upsert(cheaper), Change::Updated);
        assert_ne!(c.revision(), before);
        assert_eq!(c.get(&first.id).map(|p| p.price), Some(1.0));
        let gone = Product { available: false, ..first.clone() };
        c.upsert(gone);
        assert!(c.get(&first.id).is_some() && c.available(&first.id).is_none());
        assert!(c.by_popularity().all(|p| p.id != first.id));
        assert!(c.in_category(&first.category).all(|p| p.id != first.id));
        let shop = Product {
            id: "SKU-RED-SHOE-42".into(),
            name: "Red shoe".into(),
            category: "shoes".into(),
            price: 59.9,
            brand: Some("Acme".into()),
            available: true,
            popularity: 0.0,
        };
        assert_eq!(c.upsert(shop), Change::Added);
        assert!(c.is_category("shoes"));
        assert_eq!(c.categories().last(), Some("shoes"));
        assert_eq!(c.len(), 4);
    }
}
