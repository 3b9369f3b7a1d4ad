"""`patch_model` / `unpatch_model` / `PatchReport` (`patcher`), the per-module swaps (`swaps`) and the one family
table (`families`)."""
