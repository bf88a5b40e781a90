"""bench.expert_tiles: tiles of the persistent expert GEMM walk against the padded grid, counted by hand."""
from bench.expert_tiles import skewed, tile_counts
from kernels.triton.configs import DEFAULTS


def test_walked_tiles_are_the_real_tiles_of_each_expert():
    assert DEFAULTS["fprop_grouped"].block_m == 128 and DEFAULTS["fprop_grouped"].block_n == 128
    t = tile_counts([0, 300, 1, 0, 129, 2], n=150, k=300, sms=4)
    # 300 rows: 3 tiles, 1: 1, 129: 2, 2: 1 -> 7 row tiles x 2 column tiles; bound (432 + 127 * 6) // 128 = 9
    assert t == {"padded_tiles": 18, "walked_tiles": 14, "programs": 4, "rows_covered": 896, "rows": 432,
                 "block_m": 128}
    assert tile_counts([0, 0], n=150, k=300)["walked_tiles"] == 0


def test_skewed_counts():
    counts = skewed(1000, 8, empty=3)
    assert sum(counts) == 1000 and counts[5:] == [0, 0, 0] and counts == sorted(counts, reverse=True)
