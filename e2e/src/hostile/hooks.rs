//! Hostile cases: hooks.

use super::Case;

/// This module's cases.
pub fn cases() -> Vec<Case> {
    Vec::new()
}
