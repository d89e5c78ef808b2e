//! Hostile cases: api.

use super::Case;

/// This module's cases.
pub fn cases() -> Vec<Case> {
    Vec::new()
}
