//! The reference's KV-cache strategies, by name: how an attention call at unrolled layer σ
//! looks up a past position that has no entry at σ (because it exited before reaching that
//! iteration), and how iterations share ("compress") slots.
//!
//! Indices are the reference's `step_idx`: prelude layer `l` → `l`, core layer `j` of iteration
//! `i` → `l_P + l_R·i + j`, coda layer `l` → `−(l+1)`. The reference hard-codes the (2,4,2)
//! layout ("m4", "σ − 2"); here `4` is the core layer count `l_R` and `2` the prelude's `l_P`,
//! which gives exactly the reference's behaviour for (2,4,2).

use std::str::FromStr;

/// Where a query at σ reads a past position from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// The entry at σ; positions without one are left out.
    Full,
    /// The deepest `s ≤ σ` of the same core layer that the position has.
    LatestM,
    /// σ when present, else as `LatestM`.
    AvailableM,
    /// The position's deepest entry of the same core layer, also beyond σ.
    AlwaysLastM,
    /// Only positions that have σ.
    Skip,
}

/// How core slots are shared between iterations (applied to writes and reads alike).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compress {
    None,
    /// `σ' = (σ − l_P) mod K + l_P`: K layer-step slots reused cyclically.
    Modulo(usize),
    /// `σ' = (σ − l_P) div K + l_P`: groups of K consecutive layer-steps share one slot.
    Relative(usize),
    /// The first 8 iterations exact, every later one in the slots of iteration 8.
    Anchor,
}

/// A named strategy such as `full`, `latest-m4`, `compress-s16` or `latest-m4-compress-s16`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Strategy {
    pub lookup: Lookup,
    pub compress: Compress,
}

impl Default for Strategy {
    fn default() -> Self {
        Self {
            lookup: Lookup::Full,
            compress: Compress::None,
        }
    }
}

/// The reference's name (with its "m4"; any core layer count parses back to the same).
impl std::fmt::Display for Strategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let lookup = match self.lookup {
            Lookup::Full => "full",
            Lookup::LatestM => "latest-m4",
            Lookup::AvailableM => "available-m4",
            Lookup::AlwaysLastM => "always-last-m4",
            Lookup::Skip => "skip",
        };
        match (self.lookup, self.compress) {
            (_, Compress::None) => write!(f, "{lookup}"),
            (Lookup::Full, compress) => write!(f, "{}", CompressName(compress)),
            (_, compress) => write!(f, "{lookup}-{}", CompressName(compress)),
        }
    }
}

struct CompressName(Compress);

impl std::fmt::Display for CompressName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Compress::None => Ok(()),
            Compress::Modulo(k) => write!(f, "compress-s{k}"),
            Compress::Relative(k) => write!(f, "compress-r{k}"),
            Compress::Anchor => write!(f, "compress-anchor"),
        }
    }
}

impl FromStr for Strategy {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        let bad = || format!("unknown cache strategy {name:?}");
        let (lookup_name, compress_name) = match name.find("compress-") {
            Some(0) => ("full", &name["compress-".len()..]),
            Some(at) => (
                name[..at].strip_suffix('-').ok_or_else(bad)?,
                &name[at + "compress-".len()..],
            ),
            None => (name, ""),
        };
        // "-m4" names the reference's core layer count; any count is accepted and the model's
        // own is used.
        let modular = |prefix: &str| {
            lookup_name
                .strip_prefix(prefix)
                .is_some_and(|m| !m.is_empty() && m.bytes().all(|b| b.is_ascii_digit()))
        };
        let lookup = match lookup_name {
            "full" => Lookup::Full,
            "skip" => Lookup::Skip,
            _ if modular("latest-m") => Lookup::LatestM,
            _ if modular("available-m") => Lookup::AvailableM,
            _ if modular("always-last-m") => Lookup::AlwaysLastM,
            _ => return Err(bad()),
        };
        let compress = match compress_name {
            "" => Compress::None,
            "anchor" => Compress::Anchor,
            n => {
                let (kind, k) = n.split_at(1);
                let k: usize = k.parse().map_err(|_| bad())?;
                if k == 0 {
                    return Err(bad());
                }
                match kind {
                    "s" => Compress::Modulo(k),
                    "r" => Compress::Relative(k),
                    _ => return Err(bad()),
                }
            }
        };
        Ok(Self { lookup, compress })
    }
}

/// The reference layout numbers a strategy needs.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    pub prelude: usize,
    pub core: usize,
}

/// Iterations the anchor compression keeps exact.
const ANCHOR_ITERATIONS: usize = 8;

impl Strategy {
    /// The slot σ is stored in.
    pub fn compress(&self, sigma: i64, layout: Layout) -> i64 {
        let (p, c) = (layout.prelude as i64, layout.core as i64);
        if sigma < p {
            return sigma;
        }
        let rel = sigma - p;
        match self.compress {
            Compress::None => sigma,
            Compress::Modulo(k) => rel % k as i64 + p,
            Compress::Relative(k) => rel / k as i64 + p,
            Compress::Anchor => {
                let exact = ANCHOR_ITERATIONS as i64 * c;
                if rel < exact {
                    sigma
                } else {
                    p + exact + (rel - exact) % c
                }
            }
        }
    }

    /// The slot to read for a position at query slot σ (already compressed), given the slots
    /// that position has (ascending); `None` leaves the position out.
    pub fn lookup(&self, sigma: i64, has: &[i64], layout: Layout) -> Option<i64> {
        let present = has.contains(&sigma);
        let (p, c) = (layout.prelude as i64, layout.core as i64);
        if sigma < 0 {
            return present.then_some(sigma);
        }
        if sigma < p {
            // Prelude: the entry itself, else the first layer's (every position has layer 0).
            return match self.lookup {
                Lookup::Full | Lookup::Skip | Lookup::AvailableM => present.then_some(sigma),
                _ => Some(if present { sigma } else { 0 }),
            };
        }
        let same_layer = |s: &&i64| **s >= p && (**s - p) % c == (sigma - p) % c;
        match self.lookup {
            Lookup::Full | Lookup::Skip => present.then_some(sigma),
            Lookup::LatestM => has.iter().filter(same_layer).filter(|s| **s <= sigma).max().copied(),
            Lookup::AvailableM => {
                if present {
                    Some(sigma)
                } else {
                    has.iter().filter(same_layer).filter(|s| **s <= sigma).max().copied()
                }
            }
            Lookup::AlwaysLastM => has.iter().filter(same_layer).max().copied(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const M4: Layout = Layout { prelude: 2, core: 4 };

    #[test]
    fn parses_reference_names() {
        let s = |n: &str| n.parse::<Strategy>().unwrap();
        assert_eq!(s("full"), Strategy::default());
        assert_eq!(s("latest-m4").lookup, Lookup::LatestM);
        assert_eq!(
            s("compress-s16"),
            Strategy {
                lookup: Lookup::Full,
                compress: Compress::Modulo(16)
            }
        );
        assert_eq!(
            s("latest-m4-compress-anchor"),
            Strategy {
                lookup: Lookup::LatestM,
                compress: Compress::Anchor
            }
        );
        assert_eq!(s("compress-r4").compress, Compress::Relative(4));
        assert!("latest".parse::<Strategy>().is_err());
        assert!("latest-m4x".parse::<Strategy>().is_err());
        assert!("compress-s0".parse::<Strategy>().is_err());
        for name in [
            "full",
            "skip",
            "latest-m4",
            "always-last-m4-compress-anchor",
            "compress-r4",
            "available-m4-compress-s16",
        ] {
            assert_eq!(s(name).to_string(), name);
        }
    }

    #[test]
    fn compression_maps_as_the_reference() {
        let s16 = "compress-s16".parse::<Strategy>().unwrap();
        // σ' = (σ − 2) mod 16 + 2: iteration i uses the slots of iteration i mod 4.
        assert_eq!(s16.compress(2 + 4 * 5 + 3, M4), 2 + 4 + 3);
        assert_eq!(s16.compress(1, M4), 1);
        assert_eq!(s16.compress(-2, M4), -2);
        let anchor = "compress-anchor".parse::<Strategy>().unwrap();
        assert_eq!(anchor.compress(33, M4), 33);
        assert_eq!(anchor.compress(34 + 4 * 7 + 1, M4), 35);
        let r4 = "compress-r4".parse::<Strategy>().unwrap();
        assert_eq!(r4.compress(2 + 4 * 3 + 1, M4), 5);
    }

    #[test]
    fn lookups_fall_back_to_the_same_core_layer() {
        let latest = "latest-m4".parse::<Strategy>().unwrap();
        let has = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]; // iterations 0 and 1 (layers 0..3), layers 0..1 of 2
        assert_eq!(latest.lookup(2 + 4 * 3 + 1, &has, M4), Some(7), "iteration 1, layer 1");
        assert_eq!(
            latest.lookup(2 + 4 * 2 + 1, &has, M4),
            Some(7),
            "iteration 2 is missing"
        );
        assert_eq!(latest.lookup(9, &has, M4), Some(9), "own entry");
        let always = "always-last-m4".parse::<Strategy>().unwrap();
        assert_eq!(always.lookup(3, &has, M4), Some(7));
        let full = Strategy::default();
        assert_eq!(full.lookup(20, &has, M4), None);
        assert_eq!(full.lookup(-1, &[-1, 0], M4), Some(-1));
    }
}
