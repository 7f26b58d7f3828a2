//! The product catalog: the one source of truth for product data (id, name, category, price,
//! popularity prior) in every RetargetIQ service.
//!
//! The catalog is generated deterministically from a fixed seed, so every process — every
//! service, the simulator and the tests — sees exactly the same products without sharing a
//! file or a database. Product ids look like `P00042`; category ids are lowercase slugs.

use std::collections::HashMap;
use std::sync::LazyLock;

use serde::Serialize;

/// Number of products in the catalog.
pub const PRODUCT_COUNT: usize = 2_400;

/// A product as every service knows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Product {
    pub id: String,
    pub name: String,
    pub category: &'static str,
    pub price: f64,
    /// Prior popularity in `(0, 1]`, Zipf-like within each category; used for cold start.
    pub popularity: f64,
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

/// The catalog: products by id and by category.
#[derive(Debug)]
pub struct Catalog {
    products: Vec<Product>,
    by_id: HashMap<String, usize>,
    by_category: HashMap<&'static str, Vec<usize>>,
    /// Indexes of all products, most popular (by prior) first, ties by id.
    by_popularity: Vec<usize>,
}

static GLOBAL: LazyLock<Catalog> = LazyLock::new(|| Catalog::generate(0x5EED_CA7A_1060));

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
    /// The catalog every service uses.
    pub fn global() -> &'static Catalog {
        &GLOBAL
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
                    category: spec.id,
                    price,
                    // Zipf prior within the category (rank 0 is the best seller).
                    popularity: 1.0 / (rank as f64 + 1.0).powf(0.8),
                });
            }
        }
        let by_id = products.iter().enumerate().map(|(i, p)| (p.id.clone(), i)).collect();
        let mut by_category: HashMap<&'static str, Vec<usize>> = HashMap::new();
        for (i, p) in products.iter().enumerate() {
            by_category.entry(p.category).or_default().push(i);
        }
        let mut by_popularity: Vec<usize> = (0..products.len()).collect();
        by_popularity.sort_by(|&a, &b| {
            products[b].popularity.total_cmp(&products[a].popularity).then_with(|| products[a].id.cmp(&products[b].id))
        });
        Self { products, by_id, by_category, by_popularity }
    }

    pub fn get(&self, id: &str) -> Option<&Product> {
        self.by_id.get(id).map(|&i| &self.products[i])
    }

    pub fn products(&self) -> &[Product] {
        &self.products
    }

    /// Category ids, in catalog order.
    pub fn categories(&self) -> impl Iterator<Item = &'static str> {
        CATEGORIES.iter().map(|c| c.id)
    }

    pub fn is_category(&self, id: &str) -> bool {
        self.by_category.contains_key(id)
    }

    /// The products of a category, best sellers (by prior popularity) first.
    pub fn in_category(&self, category: &str) -> impl Iterator<Item = &Product> {
        self.by_category.get(category).into_iter().flatten().map(|&i| &self.products[i])
    }

    /// All products, most popular by prior first, across categories (cold-start fallback).
    /// The order is computed once, with the catalog.
    pub fn by_popularity(&self) -> impl Iterator<Item = &Product> {
        self.by_popularity.iter().map(|&i| &self.products[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalog_is_deterministic_and_complete() {
        let a = Catalog::generate(0x5EED_CA7A_1060);
        let b = Catalog::global();
        assert_eq!(a.products(), b.products());
        assert_eq!(b.products().len(), PRODUCT_COUNT);
        assert_eq!(b.categories().count(), CATEGORIES.len());
        for p in b.products() {
            assert!(p.price > 0.0 && p.price.is_finite(), "{p:?}");
            assert_eq!(b.get(&p.id), Some(p));
            assert!(b.is_category(p.category));
        }
    }

    #[test]
    fn category_lookup_and_popularity() {
        let c = Catalog::global();
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
}
