"""The CPU emulator of mx.fast.metal_kernel: one test per feature of the Metal subset, the
checks it makes, and mlx-lm's own Metal kernels against their MLX references."""

import importlib.util
import os

import mlx.core as mx
import numpy as np
import pytest

from flashhead_mlx.testing import metal_emulator
from flashhead_mlx.testing.metal_emulator import (
    EmulatorError,
    emulate,
    metal_kernel,
    rewrite_threadgroup,
)


def run(source, inputs, output_shapes, output_dtypes, grid, threadgroup, header="", template=None,
        init_value=None, shuffle=False, seed=0, ensure_row_contiguous=True, atomic_outputs=False,
        input_names=None, output_names=None, mode=None, msl="3.2"):
    """Compile and run a one-off kernel; the inputs are named x, y, z, ... unless named."""
    input_names = input_names or ["x", "y", "z", "u", "v"][: len(inputs)]
    output_names = output_names or [f"out{i}" for i in range(len(output_shapes))]
    kernel = metal_kernel("test", input_names, output_names, source, header, ensure_row_contiguous,
                          atomic_outputs, shuffle=shuffle, seed=seed, mode=mode, msl=msl)
    outputs = kernel(inputs=inputs, output_shapes=output_shapes, output_dtypes=output_dtypes,
                     grid=grid, threadgroup=threadgroup, template=template, init_value=init_value)
    return [np.array(o.astype(mx.float32) if o.dtype == mx.bfloat16 else o) for o in outputs]


def butterfly(values: np.ndarray, op) -> np.ndarray:
    """Apple's SIMD reduction order: xor 1, 2, 4, 8, 16."""
    v = values.copy()
    for m in (1, 2, 4, 8, 16):
        v = op(v, v[np.arange(32) ^ m])
    return v


# ---------------------------------------------------------------------------------------------
# The kernel MLX would compile


@pytest.mark.parametrize("atomic_outputs", [False, True])
def test_source_matches_mlx_generated_source(tmp_path, capfd, atomic_outputs):
    source = """
        uint i = thread_position_in_grid.x + simdgroup_index_in_threadgroup;
        out[i] = x[i] * x_shape[0] + n + y[0] + x_ndim + y_strides[0] + z[0];
    """
    names = dict(name="sig", input_names=["x", "n", "y", "z"], output_names=["out"], source=source,
                 header="// header\n", atomic_outputs=atomic_outputs)
    call = dict(template=[("T", mx.float16), ("N", 4), ("B", True)], grid=(4, 1, 1),
                threadgroup=(4, 1, 1), output_shapes=[(4,)], output_dtypes=[mx.float32])
    x, y, z = mx.zeros((4,)), mx.zeros((2, 3), dtype=mx.bfloat16), mx.zeros((16,), dtype=mx.int32)
    kernel = mx.fast.metal_kernel(**names)

    def f(x, y, z):
        return kernel(inputs=[x, 3, y, z], verbose=True, **call)[0]

    # Exporting traces the call without running it, which works without Metal.
    capfd.readouterr()
    mx.export_function(str(tmp_path / "f.mlxfn"), f, x, y, z)
    printed = capfd.readouterr().out
    expected = printed.split("```\n", 1)[1].rsplit("\n```", 1)[0]

    emulated = metal_kernel(**names)
    inputs = [x, mx.array(3), y, z]
    assert emulated.cpp_source(inputs, call["output_dtypes"], call["template"])[0] == expected


def test_rewrite_threadgroup_places_declarations_only():
    source = """
    inline float f(threadgroup float* a, const threadgroup uint& n) { return a[n]; }
    threadgroup float buf[2][32];
    threadgroup atomic_uint count;
    auto p = (threadgroup float*)buf;
    threadgroup_barrier(mem_flags::mem_threadgroup); // threadgroup memory
    """
    rewritten = rewrite_threadgroup(source)
    assert "typedef float emu_type_buf[2][32]; emu_type_buf& buf = " in rewritten
    assert "typedef atomic_uint emu_type_count; emu_type_count& count = " in rewritten
    assert rewritten.count("emu::threadgroup_memory(") == 2
    assert rewritten.count("\n") == source.count("\n")
    assert "threadgroup float* a, const threadgroup uint& n" in rewritten
    assert "(threadgroup float*)buf" in rewritten
    assert "threadgroup_barrier(mem_flags::mem_threadgroup);" in rewritten
    with pytest.raises(EmulatorError, match="threadgroup declaration"):
        rewrite_threadgroup("threadgroup float (buf)[4];")
    with pytest.raises(EmulatorError, match="initializer"):
        rewrite_threadgroup("threadgroup float total = 0;")


# ---------------------------------------------------------------------------------------------
# Threads, SIMD groups and threadgroups


def test_thread_position_attributes_in_a_nonuniform_3d_grid():
    grid, group = (37, 5, 3), (16, 2, 2)
    source = """
        uint3 g = thread_position_in_grid;
        uint i = (g.z * threads_per_grid.y + g.y) * threads_per_grid.x + g.x;
        uint3 v[6] = {thread_position_in_grid, thread_position_in_threadgroup,
                      threadgroup_position_in_grid, threads_per_threadgroup,
                      dispatch_threads_per_threadgroup, threadgroups_per_grid};
        for (int k = 0; k < 6; k++) {
            for (int j = 0; j < 3; j++) {
                out0[i * 23 + 3 * k + j] = v[k][j];
            }
        }
        out0[i * 23 + 18] = thread_index_in_threadgroup;
        out0[i * 23 + 19] = thread_index_in_simdgroup;
        out0[i * 23 + 20] = simdgroup_index_in_threadgroup;
        out0[i * 23 + 21] = simdgroups_per_threadgroup;
        out0[i * 23 + 22] = threads_per_simdgroup;
    """
    n = int(np.prod(grid))
    (out,) = run(source, [mx.zeros((1,))], [(n * 23,)], [mx.uint32], grid, group)
    out = out.reshape(grid[2], grid[1], grid[0], 23)
    g, t = np.array(grid), np.array(group)
    for z in range(grid[2]):
        for y in range(grid[1]):
            for x in range(grid[0]):
                pos = np.array([x, y, z])
                tg, local = pos // t, pos % t
                size = np.minimum(t, g - tg * t)
                index = local[0] + size[0] * (local[1] + size[1] * local[2])
                expected = [*pos, *local, *tg, *size, *t, *(-(-g // t)),
                            index, index % 32, index // 32, -(-size.prod() // 32), 32]
                np.testing.assert_array_equal(out[z, y, x], expected)


def test_simd_reductions_over_active_lanes():
    # 40 threads per threadgroup: the second SIMD group has 8 lanes; lanes with lane % 3 == 1
    # skip the collectives, so they are inactive.
    source = """
        uint i = thread_position_in_grid.x;
        uint lane = thread_index_in_simdgroup;
        if (lane % 3 != 1) {
            out0[i] = simd_sum(x[i]);
            out1[i] = simd_max(x[i]);
            out2[i] = simd_min(x[i]);
            out3[i] = simd_product(y[i]);
            out4[i] = simd_prefix_exclusive_sum(x[i]);
            out5[i] = simd_prefix_inclusive_sum(x[i]);
            out6[i] = simd_sum(z[i]);
            out7[i] = simd_xor(z[i]) + (simd_and(z[i]) << 8) + (simd_or(z[i]) << 16);
        }
    """
    n, group = 80, 40
    rng = np.random.default_rng(0)
    x = rng.normal(size=n).astype(np.float32)
    y = rng.uniform(0.5, 1.5, size=n).astype(np.float32)
    z = rng.integers(0, 256, size=n).astype(np.int32)
    outs = run(source, [mx.array(x), mx.array(y), mx.array(z)], [(n,)] * 8,
               [mx.float32] * 6 + [mx.int32] * 2, (n, 1, 1), (group, 1, 1), init_value=-7)
    for first in (0, 32, 40, 72):  # the SIMD groups: 32 + 8 lanes per threadgroup
        lanes = np.arange(first, min(first + 32, (first // group + 1) * group))
        active = lanes[(lanes - first) % 3 != 1]

        def lanes_of(values, fill):
            padded = np.full(32, fill, values.dtype)
            padded[active - first] = values[active]
            return padded

        expected_sum = butterfly(lanes_of(x, 0), np.add)[0]
        expected_prod = butterfly(lanes_of(y, 1), np.multiply)[0]
        prefix = np.cumsum(x[active], dtype=np.float32)
        np.testing.assert_array_equal(outs[0][active], expected_sum)
        np.testing.assert_array_equal(outs[1][active], x[active].max())
        np.testing.assert_array_equal(outs[2][active], x[active].min())
        np.testing.assert_array_equal(outs[3][active], expected_prod)
        np.testing.assert_array_equal(outs[4][active], np.append(0, prefix[:-1]))
        np.testing.assert_array_equal(outs[5][active], prefix)
        np.testing.assert_array_equal(outs[6][active], z[active].sum())
        bits = np.bitwise_xor.reduce(z[active]) + (np.bitwise_and.reduce(z[active]) << 8) + (
            np.bitwise_or.reduce(z[active]) << 16)
        np.testing.assert_array_equal(outs[7][active], bits)
        inactive = np.setdiff1d(lanes, active)
        assert (outs[0][inactive] == -7).all()


def test_simd_shuffles_and_broadcasts():
    source = """
        uint i = thread_position_in_grid.x;
        uint lane = thread_index_in_simdgroup;
        float v = x[i];
        out0[i * 8 + 0] = simd_shuffle(v, (lane * 7) % 32);
        out0[i * 8 + 1] = simd_shuffle_xor(v, 5);
        out0[i * 8 + 2] = simd_shuffle_down(v, 3);
        out0[i * 8 + 3] = simd_shuffle_up(v, 3);
        out0[i * 8 + 4] = simd_broadcast(v, 9);
        out0[i * 8 + 5] = simd_shuffle_rotate_down(v, 30);
        out0[i * 8 + 6] = simd_shuffle_rotate_up(v, 4);
        out0[i * 8 + 7] = simd_broadcast_first(v);
    """
    n = 64
    x = np.random.default_rng(1).normal(size=n).astype(np.float32)
    (out,) = run(source, [mx.array(x)], [(n * 8,)], [mx.float32], (n, 1, 1), (n, 1, 1))
    out = out.reshape(n, 8)
    for first in (0, 32):
        v, lane = x[first:first + 32], np.arange(32)
        expected = np.stack([
            v[(lane * 7) % 32], v[lane ^ 5], v[np.where(lane + 3 < 32, lane + 3, lane)],
            v[np.where(lane >= 3, lane - 3, lane)], np.full(32, v[9]), v[(lane + 30) % 32],
            v[(lane - 4) % 32], np.full(32, v[0]),
        ], axis=1)
        np.testing.assert_array_equal(out[first:first + 32], expected)


def test_simd_votes_and_first_active_lane():
    source = """
        uint i = thread_position_in_grid.x;
        uint lane = thread_index_in_simdgroup;
        if (lane >= 5) {
            out0[i] = simd_any(x[i] > 2.0f) + 2 * simd_all(x[i] > -5.0f) + 4 * simd_is_first();
        }
    """
    x = np.zeros(32, np.float32)
    x[7] = 3.0
    (out,) = run(source, [mx.array(x)], [(32,)], [mx.int32], (32, 1, 1), (32, 1, 1), init_value=0)
    np.testing.assert_array_equal(out, [0] * 5 + [1 + 2 + 4] + [1 + 2] * 26)


def test_threadgroup_memory_barriers_and_header_functions():
    header = """
    inline float neighbours(threadgroup float* b, uint t, uint n) {
        return b[t] + b[(t + 1) % n];
    }
    """
    source = """
        threadgroup float buf[2][64];
        uint i = thread_position_in_grid.x;
        uint t = thread_index_in_threadgroup, n = threads_per_threadgroup.x;
        buf[0][t] = x[i];
        threadgroup_barrier(mem_flags::mem_threadgroup);
        buf[1][t] = 2.0f * buf[0][n - 1 - t];
        threadgroup_barrier(mem_flags::mem_threadgroup);
        out0[i] = neighbours(buf[1], t, n);
    """
    n, group = 200, 64
    x = np.arange(n, dtype=np.float32)
    (out,) = run(source, [mx.array(x)], [(n,)], [mx.float32], (n, 1, 1), (group, 1, 1), header)
    expected = []
    for start in range(0, n, group):
        block = x[start:start + group]
        flipped = 2 * block[::-1]
        expected.append(flipped + np.roll(flipped, -1))
    np.testing.assert_array_equal(out, np.concatenate(expected))


# ---------------------------------------------------------------------------------------------
# Types and functions


def test_half_and_bfloat_arithmetic_rounds_like_mlx():
    source = """
        uint i = thread_position_in_grid.x;
        half a = static_cast<half>(x[i]), b = static_cast<half>(y[i]);
        out0[i] = a * b;
        bfloat16_t c = static_cast<bfloat16_t>(x[i]), d = static_cast<bfloat16_t>(y[i]);
        out1[i] = c + d;
        out2[i] = static_cast<float>(c) * static_cast<float>(b);
    """
    rng = np.random.default_rng(2)
    x, y = (mx.array(rng.normal(size=300).astype(np.float32) * 10) for _ in range(2))
    halfs, bfloats, mixed = run(source, [x, y], [(300,)] * 3, [mx.float16, mx.bfloat16, mx.float32],
                                (300, 1, 1), (64, 1, 1))
    np.testing.assert_array_equal(halfs, np.array(x.astype(mx.float16) * y.astype(mx.float16)))
    expected = (x.astype(mx.bfloat16) + y.astype(mx.bfloat16)).astype(mx.float32)
    np.testing.assert_array_equal(bfloats, np.array(expected))
    x_bf16, y_f16 = x.astype(mx.bfloat16), y.astype(mx.float16)
    np.testing.assert_array_equal(mixed, np.array(x_bf16.astype(mx.float32) * y_f16.astype(mx.float32)))


def test_math_functions():
    functions = {
        "metal::exp(v)": np.exp, "fast::exp(v)": np.exp, "metal::precise::exp(v)": np.exp,
        "exp2(v)": np.exp2, "log(v)": np.log, "log2(v)": np.log2, "sqrt(v)": np.sqrt,
        "rsqrt(v)": lambda v: 1 / np.sqrt(v), "metal::precise::rsqrt(v)": lambda v: 1 / np.sqrt(v),
        "tanh(v)": np.tanh, "fast::sin(v)": np.sin, "metal::fast::cos(v)": np.cos,
        "pow(v, 1.5f)": lambda v: v ** 1.5, "metal::abs(-v)": np.abs, "floor(v)": np.floor,
        "ceil(v)": np.ceil, "round(v)": lambda v: np.sign(v) * np.floor(np.abs(v) + 0.5),
        "max(v, 1.0f)": lambda v: np.maximum(v, 1), "min(v, 1.0f)": lambda v: np.minimum(v, 1),
        "fmax(v, 2.0f)": lambda v: np.maximum(v, 2),
        "clamp(v, 0.5f, 2.0f)": lambda v: np.clip(v, 0.5, 2),
        "select(v, -v, v > 2.0f)": lambda v: np.where(v > 2, -v, v),
        "float(max(uint(v * 10), 7u))": lambda v: np.maximum((v * 10).astype(np.uint32), 7),
        "float(as_type<uint>(v) >> 23)": lambda v: (v.view(np.uint32) >> 23).astype(np.float32),
        "(isnan(v) ? 1.0f : 0.0f) + (isinf(v / 0.0f) ? 2.0f : 0.0f)": lambda v: np.full_like(v, 2),
    }
    n = len(functions)
    body = "\n".join(f"out0[i * {n} + {k}] = {expr};" for k, expr in enumerate(functions))
    source = f"uint i = thread_position_in_grid.x;\nfloat v = x[i];\n{body}"
    x = np.random.default_rng(3).uniform(0.1, 4.0, size=100).astype(np.float32)
    (out,) = run(source, [mx.array(x)], [(100 * len(functions),)], [mx.float32], (100, 1, 1),
                 (32, 1, 1))
    out = out.reshape(100, len(functions))
    for k, (expr, f) in enumerate(functions.items()):
        np.testing.assert_allclose(out[:, k], f(x).astype(np.float32), rtol=2e-6, err_msg=expr)


def test_limits_and_simdgroup_barrier():
    source = """
        uint i = thread_position_in_grid.x;
        simdgroup_barrier(mem_flags::mem_none);
        out0[i * 4 + 0] = float(metal::numeric_limits<half>::max());
        out0[i * 4 + 1] = float(Limits<bfloat16_t>::finite_min);
        out0[i * 4 + 2] = Limits<float>::min;
        out0[i * 4 + 3] = ceildiv(int(i) + 5, 4);
    """
    (out,) = run(source, [mx.zeros((1,))], [(8,)], [mx.float32], (2, 1, 1), (2, 1, 1))
    bf16_min = float(np.array(mx.array(-3.3895e38, dtype=mx.bfloat16).astype(mx.float32)))
    np.testing.assert_array_equal(out.reshape(2, 4), [[65504, bf16_min, -np.inf, 2]] * 2)


def test_vector_types():
    source = """
        uint i = thread_position_in_grid.x;
        float4 v = ((const device float4*)x)[i];
        float4 w = v * 2.0f + float4(1.0f, 2.0f, 3.0f, 4.0f);
        half4 h = half4(w);
        out0[i] = dot(v, w) + float(h.w);
        uint3 p = thread_position_in_grid;
        out1[i] = p.x + p.y + p.z;
    """
    x = np.random.default_rng(4).normal(size=(50, 4)).astype(np.float32)
    dots, ids = run(source, [mx.array(x)], [(50,), (50,)], [mx.float32, mx.uint32], (50, 1, 1),
                    (16, 1, 1))
    w = x * 2 + np.array([1, 2, 3, 4], np.float32)
    np.testing.assert_allclose(dots, (x * w).sum(1) + w[:, 3].astype(np.float16), rtol=1e-5)
    np.testing.assert_array_equal(ids, np.arange(50))


def test_atomic_outputs_and_threadgroup_atomics():
    n = 500
    bins = np.random.default_rng(5).integers(0, 13, size=n).astype(np.int32)
    source = """
        uint i = thread_position_in_grid.x;
        atomic_fetch_add_explicit(&out0[x[i]], 1, memory_order_relaxed);
    """
    (hist,) = run(source, [mx.array(bins)], [(13,)], [mx.int32], (n, 1, 1), (64, 1, 1),
                  init_value=0, atomic_outputs=True)
    np.testing.assert_array_equal(hist, np.bincount(bins, minlength=13))

    source = """
        threadgroup atomic_uint count;
        uint t = thread_index_in_threadgroup;
        if (t == 0) {
            atomic_store_explicit(&count, 0u, memory_order_relaxed);
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        if (x[thread_position_in_grid.x] > 6) {
            atomic_fetch_add_explicit(&count, 1u, memory_order_relaxed);
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        if (t == 0) {
            uint n = atomic_load_explicit(&count, memory_order_relaxed);
            out0[threadgroup_position_in_grid.x] = n;
        }
    """
    (counts,) = run(source, [mx.array(bins)], [(8,)], [mx.uint32], (n, 1, 1), (64, 1, 1))
    np.testing.assert_array_equal(counts, [(bins[s:s + 64] > 6).sum() for s in range(0, n, 64)])


@pytest.mark.parametrize("contiguous", [False, True])
def test_shapes_strides_and_noncontiguous_inputs(contiguous):
    source = """
        uint i = thread_position_in_grid.x;
        out0[i] = x[elem_to_loc(i, x_shape, x_strides, x_ndim)]
                + y[elem_to_loc(i, y_shape, y_strides, y_ndim)];
        if (i < 3) {
            out1[i] = x_strides[i];
        }
    """
    base = mx.arange(24, dtype=mx.float32).reshape(2, 3, 4)
    x = base.transpose(2, 0, 1)
    y = mx.broadcast_to(mx.array([100.0, 200.0, 300.0]), (4, 2, 3))
    values, strides = run(source, [x, y], [(24,), (3,)], [mx.float32, mx.int64], (24, 1, 1),
                          (8, 1, 1), ensure_row_contiguous=contiguous)
    np.testing.assert_array_equal(values, (np.array(x) + np.array(y)).ravel())
    np.testing.assert_array_equal(strides, [6, 3, 1] if contiguous else [1, 12, 4])


def test_unwritten_outputs_are_nan_and_init_value_fills():
    source = "uint i = thread_position_in_grid.x; if (i % 2 == 0) { out0[i] = 1.0f; }"
    (out,) = run(source, [mx.zeros((1,))], [(8,)], [mx.float32], (8, 1, 1), (8, 1, 1))
    assert (out[::2] == 1).all() and np.isnan(out[1::2]).all()
    (out,) = run(source, [mx.zeros((1,))], [(8,)], [mx.bfloat16], (8, 1, 1), (8, 1, 1),
                 init_value=3)
    np.testing.assert_array_equal(out, [1, 3] * 4)


# ---------------------------------------------------------------------------------------------
# Scheduling: the race check


RACY = """
    threadgroup float buf[64];
    uint t = thread_index_in_threadgroup;
    buf[t] = x[thread_position_in_grid.x];
    {barrier}
    out0[thread_position_in_grid.x] = buf[(t + 1) % 64];
"""


def test_shuffled_order_exposes_a_missing_barrier():
    x = mx.arange(256, dtype=mx.float32)
    args = ([x], [(256,)], [mx.float32], (256, 1, 1), (64, 1, 1))
    racy = RACY.replace("{barrier}", "")
    ordered = run(racy, *args)[0]
    assert any((run(racy, *args, shuffle=True, seed=s)[0] != ordered).any() for s in range(3))

    correct = RACY.replace("{barrier}", "threadgroup_barrier(mem_flags::mem_threadgroup);")
    expected = np.roll(np.arange(256.0).reshape(4, 64), -1, axis=1).ravel()
    for seed in range(3):
        np.testing.assert_array_equal(run(correct, *args, shuffle=True, seed=seed)[0], expected)


def test_emulate_patches_metal_and_restores_it():
    factory, available = mx.fast.metal_kernel, mx.metal.is_available
    with emulate(shuffle=True, seed=3, mode="check") as launches:
        source = "uint i = thread_position_in_grid.x; out0[i] = 2 * x[i];"
        kernel = mx.fast.metal_kernel(name="k", input_names=["x"], output_names=["out0"],
                                      source=source)
        assert mx.metal.is_available() and kernel.shuffle and kernel.seed == 3
        assert kernel.mode == "check" and launches == []
        (out,) = kernel(inputs=[mx.arange(4.0)], output_shapes=[(4,)], output_dtypes=[mx.float32],
                        grid=(4, 1, 1), threadgroup=(4, 1, 1))
        np.testing.assert_array_equal(np.array(out), [0, 2, 4, 6])
        assert launches == ["k"]
    assert mx.fast.metal_kernel is factory and mx.metal.is_available is available


# ---------------------------------------------------------------------------------------------
# What fails loudly


def expect_error(match, source, inputs=None, grid=(64, 1, 1), threadgroup=(64, 1, 1),
                 **kwargs):
    inputs = inputs or [mx.arange(64, dtype=mx.float32)]
    with pytest.raises(EmulatorError, match=match):
        run(source, inputs, [(64,)], [mx.float32], grid, threadgroup, **kwargs)


def test_read_past_the_end_of_an_input():
    expect_error("0 bytes past the end of input 'x'",
                 "uint i = thread_position_in_grid.x; out0[i] = x[i + 1];", mode="fast")


def test_write_past_the_end_of_an_output():
    expect_error("past the end of output 'out0'",
                 "uint i = thread_position_in_grid.x; out0[i + 4] = 1.0f;", mode="fast")


def test_barrier_not_reached_by_every_thread():
    expect_error("returned without reaching it", """
        if (thread_index_in_threadgroup == 3) { return; }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        out0[thread_position_in_grid.x] = 1.0f;
    """)


def test_divergent_simd_collectives():
    expect_error("different SIMD-group functions", """
        uint i = thread_position_in_grid.x;
        out0[i] = thread_index_in_simdgroup < 16 ? simd_sum(x[i]) : simd_max(x[i]);
    """)


def test_shuffle_from_an_inactive_lane():
    expect_error("inactive", """
        uint i = thread_position_in_grid.x;
        if (thread_index_in_simdgroup < 16) { out0[i] = simd_shuffle(x[i], 20); }
    """)


def test_unsupported_metal_fails_to_compile():
    expect_error("quad_sum", "out0[thread_position_in_grid.x] = quad_sum(x[0]);")
    expect_error("texture2d", "texture2d<float> t; out0[0] = 0;")


def test_threadgroup_larger_than_metal_allows():
    expect_error("at most 1024", "out0[0] = 0;", grid=(2048, 1, 1), threadgroup=(2048, 1, 1))
    # MLX checks the threadgroup as given, also when the grid is smaller.
    expect_error("at most 1024", "out0[0] = 0;", grid=(64, 1, 1), threadgroup=(64, 32, 1))


def test_spin_wait_times_out(monkeypatch):
    monkeypatch.setattr(metal_emulator, "TIMEOUT_S", 1)
    with pytest.raises(EmulatorError, match="spin-wait"):
        run("""
            while (atomic_load_explicit(&out0[1], memory_order_relaxed) == 0) {}
            atomic_store_explicit(&out0[0], 1, memory_order_relaxed);
        """, [mx.zeros((1,))], [(2,)], [mx.int32], (1, 1, 1), (1, 1, 1), init_value=0,
            atomic_outputs=True)


def test_threadgroup_memory_limit():
    expect_error("32784 bytes declared .*Metal allows 32768", """
        threadgroup float a[4096];
        threadgroup uint b[4100];
        a[thread_index_in_threadgroup] = 0;
        b[thread_index_in_threadgroup] = 0;
        out0[thread_position_in_grid.x] = 1.0f;
    """)
    (out,) = run("threadgroup float a[8192]; a[thread_index_in_threadgroup] = 1.0f;"
                 "out0[thread_position_in_grid.x] = a[thread_index_in_threadgroup];",
                 [mx.zeros((1,))], [(64,)], [mx.float32], (64, 1, 1), (64, 1, 1))
    assert (out == 1).all()


# ---------------------------------------------------------------------------------------------
# The checks of the "check" and "sanitize" modes, and MSL 3.1, each on a broken kernel


def test_threadgroup_memory_is_per_threadgroup_and_poisoned():
    """Threads >= 32 read what nobody wrote: 0xff bytes (NaN) in every threadgroup, also when
    threadgroups interleave; the checking mode names the read."""
    source = """
        threadgroup float buf[64];
        uint t = thread_index_in_threadgroup, i = thread_position_in_grid.x;
        if (t < 32) { buf[t] = x[i]; }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        out0[i] = buf[t];
    """
    x = np.arange(256, dtype=np.float32)
    args = ([mx.array(x)], [(256,)], [mx.float32], (256, 1, 1), (64, 1, 1))
    for shuffle in (False, True):
        (out,) = run(source, *args, shuffle=shuffle, mode="fast")
        written = np.arange(256) % 64 < 32
        np.testing.assert_array_equal(out[written], x[written])
        assert np.isnan(out[~written]).all()
    with pytest.raises(EmulatorError, match="uninitialised threadgroup memory: threadgroup 0 "
                                            "thread 32 reads byte 128 of 'buf'"):
        run(source, *args, mode="check")


def test_shuffle_interleaves_threadgroups():
    """Each threadgroup counts the threadgroups that started before it finished its barrier:
    1 when they run one after the other, more when they interleave."""
    source = """
        device atomic_uint* started = &out0[0];
        device atomic_uint* count = &out0[1 + threadgroup_position_in_grid.x];
        bool first = thread_index_in_threadgroup == 0;
        if (first) {
            uint before = atomic_fetch_add_explicit(started, 1u, memory_order_relaxed);
            atomic_store_explicit(count, before, memory_order_relaxed);
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        if (first) {
            uint now = atomic_load_explicit(started, memory_order_relaxed);
            uint before = atomic_load_explicit(count, memory_order_relaxed);
            atomic_store_explicit(count, now - before, memory_order_relaxed);
        }
    """
    args = ([mx.zeros((1,))], [(17,)], [mx.uint32], (16 * 64, 1, 1), (64, 1, 1))
    (ordered,) = run(source, *args, init_value=0, atomic_outputs=True)
    np.testing.assert_array_equal(ordered[1:], 1)
    (shuffled,) = run(source, *args, init_value=0, atomic_outputs=True, shuffle=True, seed=1)
    assert shuffled[0] == 16 and (shuffled[1:] >= 1).all() and (shuffled[1:] > 1).any()


def test_check_catches_a_race_on_threadgroup_memory():
    """Every thread adds to one threadgroup float: lost updates on a GPU."""
    source = """
        threadgroup float total[1];
        if (thread_index_in_threadgroup == 0) { total[0] = 0.0f; }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        total[0] += x[thread_position_in_grid.x];
        threadgroup_barrier(mem_flags::mem_threadgroup);
        out0[thread_position_in_grid.x] = total[0];
    """
    (out,) = run(source, [mx.ones((64,))], [(64,)], [mx.float32], (64, 1, 1), (64, 1, 1),
                 mode="fast")
    assert (out == 64).all()  # runs here without the check
    expect_error("data race on threadgroup memory: threadgroup 0 thread 1 reads byte 0 of "
                 "'total' .*which threadgroup 0 thread 0 wrote between the same barriers",
                 source, mode="check")


def test_check_catches_a_missing_barrier():
    """Each thread reads its neighbour's value, then overwrites its own without waiting for the
    neighbour to have read it."""
    source = """
        threadgroup float buf[64];
        uint t = thread_index_in_threadgroup, i = thread_position_in_grid.x;
        buf[t] = x[i];
        threadgroup_barrier(mem_flags::mem_threadgroup);
        float v = buf[(t + 1) % 64];
        {barrier}
        buf[t] = 2.0f * v;
        threadgroup_barrier(mem_flags::mem_threadgroup);
        out0[i] = buf[(t + 1) % 64];
    """
    racy = source.replace("{barrier}", "")
    expect_error("data race on threadgroup memory: threadgroup 0 thread 1 writes byte 4 of "
                 "'buf'.*which threadgroup 0 thread 0 read between the same barriers", racy,
                 mode="check")
    correct = source.replace("{barrier}", "threadgroup_barrier(mem_flags::mem_threadgroup);")
    (out,) = run(correct, [mx.arange(64, dtype=mx.float32)], [(64,)], [mx.float32], (64, 1, 1),
                 (64, 1, 1), mode="check", shuffle=True)
    np.testing.assert_array_equal(out, 2 * ((np.arange(64) + 2) % 64))


def test_check_catches_races_on_an_output():
    racy = """
        if (thread_index_in_threadgroup == 0) { out0[0] = threadgroup_position_in_grid.x; }
    """
    with pytest.raises(EmulatorError, match="data race on device memory: threadgroup 1 thread 0 "
                                            "writes byte 0 of output 'out0'.*in the same dispatch"):
        run(racy, [mx.zeros((1,))], [(1,)], [mx.uint32], (128, 1, 1), (64, 1, 1), mode="check")
    within = "out0[thread_index_in_threadgroup / 2] = thread_index_in_threadgroup;"
    with pytest.raises(EmulatorError, match="threadgroup 0 thread 1 writes byte 0 of output "
                                            "'out0'.*thread 0 wrote between the same barriers"):
        run(within, [mx.zeros((1,))], [(32,)], [mx.uint32], (64, 1, 1), (64, 1, 1), mode="check")
    atomic = """
        if (thread_index_in_threadgroup == 0) {
            uint g = threadgroup_position_in_grid.x;
            atomic_fetch_add_explicit(&out0[0], g + 1, memory_order_relaxed);
        }
    """
    (out,) = run(atomic, [mx.zeros((1,))], [(1,)], [mx.uint32], (128, 1, 1), (64, 1, 1),
                 init_value=0, atomic_outputs=True, mode="check")
    assert out[0] == 3


OUT_OF_BOUNDS = {
    "device": "uint i = thread_position_in_grid.x; out0[i] = x[int(i) - 1];",
    "threadgroup": """
        threadgroup float buf[64];
        threadgroup float* next = buf + 1;
        uint t = thread_index_in_threadgroup;
        buf[t] = x[t];
        threadgroup_barrier(mem_flags::mem_threadgroup);
        out0[t] = next[t];
    """,
}


@pytest.mark.parametrize("memory,mode,match", [
    ("device", "check", "4 bytes before the start of input 'x'"),
    ("device", "sanitize", "AddressSanitizer: heap-buffer-overflow.*kernel.metal:"),
    ("threadgroup", "check", "threadgroup memory: 0 bytes past the end of 'buf'"),
    ("threadgroup", "sanitize", "AddressSanitizer: use-after-poison.*kernel.metal:"),
])
def test_out_of_bounds_reads(memory, mode, match):
    with pytest.raises(EmulatorError, match=f"(?s){match}"):
        run(OUT_OF_BOUNDS[memory], [mx.arange(64, dtype=mx.float32)], [(64,)], [mx.float32],
            (64, 1, 1), (64, 1, 1), mode=mode)


def test_sanitize_runs_a_kernel_and_catches_undefined_behaviour():
    source = """
        uint i = thread_position_in_grid.x;
        out0[i] = simd_sum(x[i]) + float(y[i] << {shift});
    """
    x, y = mx.arange(64, dtype=mx.float32), mx.arange(64, dtype=mx.int32)
    args = ([x, y], [(64,)], [mx.float32], (64, 1, 1), (64, 1, 1))
    (out,) = run(source.replace("{shift}", "3"), *args, mode="sanitize")
    sums = np.repeat([np.arange(32).sum(), np.arange(32, 64).sum()], 32)
    np.testing.assert_array_equal(out, sums + 8 * np.arange(64))
    with pytest.raises(EmulatorError, match="runtime error: shift exponent 40"):
        run(source.replace("{shift}", "(i + 40)"), *args, mode="sanitize")


def test_msl_3_1_has_no_atomic_thread_fence():
    source = """
        atomic_thread_fence(mem_flags::mem_device, memory_order_seq_cst, thread_scope_device);
        out0[thread_position_in_grid.x] = 1.0f;
    """
    (out,) = run(source, [mx.zeros((1,))], [(4,)], [mx.float32], (4, 1, 1), (4, 1, 1), msl="3.2")
    assert (out == 1).all()
    expect_error("atomic_thread_fence is MSL 3.2", source, msl="3.1")


# ---------------------------------------------------------------------------------------------
# mlx-lm's Metal kernels (nobody here wrote them) against MLX references


def load_emulated(module: str, **options):
    """A fresh copy of an mlx-lm module whose kernels were made by the emulator: as MSL 3.1 (they
    run on macOS 14), in the checking mode unless FLASHHEAD_EMULATOR_MODE chooses one."""
    spec = importlib.util.find_spec(module)
    copy = importlib.util.module_from_spec(spec)
    options.setdefault("mode", os.environ.get("FLASHHEAD_EMULATOR_MODE", "check"))
    with emulate(msl="3.1", **options):
        spec.loader.exec_module(copy)
    return copy


def assert_close(actual, expected, dtype):
    tol = {mx.float32: 2e-5, mx.float16: 2e-3, mx.bfloat16: 1.6e-2}[dtype]
    np.testing.assert_allclose(np.array(actual.astype(mx.float32)),
                               np.array(expected.astype(mx.float32)), rtol=tol, atol=tol)


def rms(x, eps):
    return x * mx.rsqrt(mx.mean(x * x, axis=-1, keepdims=True) + eps)


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_mlx_lm_qk_norm(dtype):
    kernels = load_emulated("mlx_lm.kernels.qk_norm")
    HQ, HK, D = 4, 2, 80
    qkvg = mx.random.normal((2, 3, 2 * (HQ + HK) * D), key=mx.random.key(0)).astype(dtype)
    q, k = kernels.qk_norm(qkvg, n_heads=HQ, n_kv_heads=HK, head_dim=D, eps=1e-6, query_scale=0.3)
    heads = qkvg.reshape(2, 3, 2 * (HQ + HK), D).astype(mx.float32)
    normed = rms(heads, 1e-6).astype(dtype)
    assert_close(q, (normed[:, :, :HQ].astype(mx.float32) * 0.3).astype(dtype), dtype)
    assert_close(k, normed[:, :, HQ:HQ + HK], dtype)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_mlx_lm_rms_norm_sigmoid_gate_on_strided_input(dtype):
    kernels = load_emulated("mlx_lm.kernels.rms_norm_sigmoid_gate")
    B, H, L, D = 2, 3, 5, 64
    x = mx.random.normal((B, L, H, D), key=mx.random.key(1)).astype(dtype).transpose(0, 2, 1, 3)
    gate = mx.random.normal((B, L, H * D), key=mx.random.key(2)).astype(dtype)
    out = kernels.rms_norm_sigmoid_gate(x, gate, eps=1e-6)
    normed = rms(x.astype(mx.float32), 1e-6).transpose(0, 2, 1, 3).reshape(B, L, H * D)
    assert_close(out, (normed * mx.sigmoid(gate.astype(mx.float32))).astype(dtype), dtype)


@pytest.mark.parametrize("dim", [96, 1000])
def test_mlx_lm_norm_add_norm(dim):
    import mlx.nn as nn

    kernels = load_emulated("mlx_lm.kernels.norm_add_norm")
    keys = mx.random.split(mx.random.key(3), 6)
    branch = mx.random.normal((3, dim), key=keys[0]).astype(mx.bfloat16)
    stream = mx.random.normal((3, dim), key=keys[1])
    alpha, beta = (mx.random.uniform(0.5, 1.5, (dim,), key=k) for k in keys[2:4])
    post_w = mx.random.uniform(0.5, 1.5, (dim,), key=keys[4]).astype(mx.bfloat16)
    norm = nn.RMSNorm(dim, eps=1e-5)
    norm.weight = mx.random.uniform(0.5, 1.5, (dim,), key=keys[5])
    new_stream, normed = kernels.norm_add_norm(branch, stream, alpha=alpha, beta=beta,
                                               post_weight=post_w, post_eps=1e-6, next_norm=norm)
    v = (post_w * branch).astype(mx.float32)
    s = alpha * stream + beta * rms(v, 1e-6).astype(mx.bfloat16).astype(mx.float32)
    assert_close(new_stream, s, mx.float32)
    assert_close(normed, (rms(s, 1e-5) * norm.weight).astype(mx.bfloat16), mx.bfloat16)
    assert_close(kernels.pre_norm(s, norm, dtype=mx.bfloat16), normed, mx.bfloat16)


def test_mlx_lm_expert_routing():
    kernels = load_emulated("mlx_lm.kernels.expert_routing")
    E, K, tokens = 72, 6, 5
    logits = mx.random.normal((tokens, E), key=mx.random.key(4))
    bias = mx.random.normal((E,), key=mx.random.key(5)) * 0.1
    inds, weights = kernels.expert_routing(logits, bias, top_k=K, multiplier=1.5, score_eps=1e-20,
                                           route_scale=2.5)
    score = np.array(mx.sigmoid(logits * 1.5))
    biased = score + np.array(bias)
    expected = np.argsort(-biased, axis=-1, kind="stable")[:, :K]
    np.testing.assert_array_equal(np.array(inds), expected)
    top = np.take_along_axis(score, expected, axis=-1)
    np.testing.assert_allclose(np.array(weights), top / top.sum(-1, keepdims=True) * 2.5, rtol=1e-5)


def test_mlx_lm_ssm_update():
    ssm = load_emulated("mlx_lm.models.ssm")
    n, h, d, groups, ds = 2, 4, 16, 2, 64
    keys = mx.random.split(mx.random.key(6), 7)
    x = mx.random.normal((n, 1, h, d), key=keys[0])
    A_log = mx.random.normal((h,), key=keys[1]) * 0.5
    B, C = (mx.random.normal((n, 1, groups, ds), key=k) for k in keys[2:4])
    D = mx.random.normal((h,), key=keys[4])
    dt = mx.random.normal((n, 1, h), key=keys[5])
    dt_bias = mx.zeros((h,))
    state = mx.random.normal((n, h, d, ds), key=keys[6])
    y, new_state = ssm.ssm_update_kernel(x, A_log, B, C, D, dt, dt_bias, state, (0.001, 100.0))
    y_ref, state_ref = ssm.ssm_attn(x, A_log, B, C, D, dt, dt_bias, state, (0.001, 100.0))
    assert_close(y, y_ref, mx.float32)
    assert_close(new_state, state_ref, mx.float32)


@pytest.mark.parametrize("shuffle", [False, True])
def test_mlx_lm_gated_delta(shuffle):
    gd = load_emulated("mlx_lm.models.gated_delta", shuffle=shuffle)
    B, T, Hk, Hv, Dk, Dv = 1, 3, 1, 2, 128, 16
    keys = mx.random.split(mx.random.key(7), 6)
    q, k = (mx.random.normal((B, T, Hk, Dk), key=kk) * 0.1 for kk in keys[:2])
    v = mx.random.normal((B, T, Hv, Dv), key=keys[2])
    g = mx.random.uniform(0.8, 1.0, (B, T, Hv), key=keys[3])
    beta = mx.random.uniform(0.0, 1.0, (B, T, Hv), key=keys[4])
    state = mx.random.normal((B, Hv, Dv, Dk), key=keys[5]) * 0.1
    y_ref, state_ref = gd.gated_delta_ops(q, k, v, g, beta, state)
    y, new_state = gd.gated_delta_kernel_unpacked(q, k, v, g, beta, state)
    assert_close(y, y_ref, mx.float32)
    assert_close(new_state, state_ref, mx.float32)
    # The packed kernel is bitwise equal to the explicit-tree one by construction.
    packed = gd.gated_delta_kernel(q, k, v, g, beta, state)
    tree = gd.gated_delta_kernel_xtree(q, k, v, g, beta, state)
    for a, b in zip(packed, tree):
        np.testing.assert_array_equal(np.array(a), np.array(b))
    assert_close(packed[0], y_ref, mx.float32)


def test_mlx_lm_wkv7():
    rwkv7 = load_emulated("mlx_lm.models.rwkv7")
    B, T, H, D = 1, 3, 2, 64
    keys = mx.random.split(mx.random.key(8), 7)
    r, k, v, a, b = (mx.random.normal((B, T, H, D), key=kk) * 0.3 for kk in keys[:5])
    w = mx.random.uniform(0.8, 1.0, (B, T, H, D), key=keys[5])
    state = mx.random.normal((B, H, D, D), key=keys[6]) * 0.1
    y, new_state = rwkv7.wkv7_kernel(r, w, k, v, a, b, state)
    s, ys = state, []
    for t in range(T):
        yt, s = rwkv7._wkv7_step_ops(r[:, t], w[:, t], k[:, t], v[:, t], a[:, t], b[:, t], s)
        ys.append(yt)
    assert_close(y, mx.stack(ys, axis=1).reshape(y.shape), mx.float32)
    assert_close(new_state, s, mx.float32)
