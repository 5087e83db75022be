// FlashHead stage 2: score the rows of the probed clusters exactly and reduce them to the
// greedy token (wrapper: flashhead_mlx/kernels/cluster_argmax.py).
//
// For row b and probe p (cluster k = probes[b, p]), slot k * cluster_size + r of the head (rows
// in cluster order, float rows when BITS == 0, else MLX's affine format with groups of GS)
// has the logit h[b] . row, in float32, then softcap * tanh(logit / softcap) when softcap > 0,
// and -inf when it is a padding slot (order[slot] < 0). Output: those logits
// [B, n_probes * cluster_size] (for sampling) and the token with the highest logit per row,
// ties to the lowest token id.
//
// Design (on paper until someone runs it on a Mac):
// - Work split: threadgroups of 256 threads (8 SIMD groups), ceil(n_probes / 8) per row of h;
//   each SIMD group scores one cluster, row by row: its 32 lanes stride over the row (4
//   values or one packed word each, consecutive lanes on consecutive bytes), then simd_sum.
//   The clusters' rows are contiguous (cluster order), so a probe reads one run of
//   cluster_size * d * bytes_per_weight bytes: no ragged gathers.
// - Each SIMD group keeps its best (order_key(logit), token) pair; the threadgroup reduces its
//   8 pairs and publishes one with atomic stores; the last threadgroup of the row (an atomic
//   ticket, fences of MSL 3.2) reduces those and writes the token: one dispatch, no argmax
//   pass over the logits.
// - One output buffer (logit bits | tokens | partial pairs | tickets), zeroed by init_value.
// - Bytes read per call: B * n_probes * cluster_size * (d * bytes_per_weight + 4) (rows and
//   order; for packed rows d * (BITS / 8 + 4 / GS) with bfloat16 scales and biases), plus
//   4 bytes written per logit. cluster_size 16, n_probes = C / 16, B = 1:
//     Llama-3.2-1B (501 probes, d = 2048): bf16 32.9 MB -> M1 484 us, M4 274 us, M4 Max 60 us
//                                           4-bit 9.3 MB -> M1 137 us, M4 78 us, M4 Max 17 us
//     Qwen3-0.6B   (594 probes, d = 1024): bf16 19.6 MB -> M1 288 us, M4 163 us, M4 Max 36 us
//                                           4-bit 5.6 MB -> M1  82 us, M4 47 us, M4 Max 10 us
//     Gemma-3-270M (1024 probes, d = 640): bf16 21.2 MB -> M1 311 us, M4 176 us, M4 Max 39 us
//                                           4-bit 6.1 MB -> M1  90 us, M4 51 us, M4 Max 11 us
//   at full bandwidth (68, 120, 546 GB/s), plus the zero fill and the last threadgroup's
//   reduction of ceil(n_probes / 8) pairs (negligible).
// - Stage 1 + stage 2 per token vs the dense head (bf16 head, 4-bit centroids): Llama-3.2-1B
//   0.62 / 0.35 / 0.077 ms vs 7.7 / 4.4 / 0.96 ms on M1 / M4 / M4 Max; Gemma-3-270M
//   0.40 / 0.23 / 0.050 ms vs 4.9 / 2.8 / 0.62 ms; add ~10-20 us of dispatches and merges.
// - Needs MSL 3.2 (macOS 15) for atomic_thread_fence with thread_scope_device.

// ---- kernel body ----
  constexpr uint TG = 256, NSG = TG / 32;
  const uint B = probes_shape[0], P = probes_shape[1], D = h_shape[1], S_ = cluster_size;
  const uint G = threadgroups_per_grid.x, g = threadgroup_position_in_grid.x;
  const uint b = threadgroup_position_in_grid.y;
  const uint tid = thread_index_in_threadgroup;
  const uint lane = thread_index_in_simdgroup, sg = simdgroup_index_in_threadgroup;
  device uint* logits = out;
  device uint* tokens = out + B * P * S_;
  device atomic_uint* partials = (device atomic_uint*)(tokens + B);
  device atomic_uint* tickets = partials + 2 * B * G;

  uint best_key = 0, best_token = 0xffffffffu;
  uint p = g * NSG + sg;
  if (p < P) {
    uint k = probes[b * P + p];
    for (uint r = 0; r < S_; r++) {
      size_t slot = size_t(k) * S_ + r;
      float acc = lane_dot<BITS, GS>(h + size_t(b) * D, w, scales, biases, slot, D, lane);
      float logit = simd_sum(acc);
      if (softcap > 0.0f) {
        logit = metal::precise::tanh(logit / softcap) * softcap;
      }
      int token = order[slot];
      if (token < 0) {
        logit = -INFINITY;
      }
      if (lane == 0) {
        logits[(size_t(b) * P + p) * S_ + r] = as_type<uint>(logit);
      }
      uint key = order_key(logit);
      if (token >= 0 && better(key, uint(token), best_key, best_token)) {
        best_key = key;
        best_token = uint(token);
      }
    }
  }

  threadgroup uint buf[2 * NSG];
  threadgroup_best<TG>(best_key, best_token, buf, lane, sg, tid);
  if (tid == 0) {
    atomic_store_explicit(partials + 2 * (b * G + g), best_key, memory_order_relaxed);
    atomic_store_explicit(partials + 2 * (b * G + g) + 1, best_token, memory_order_relaxed);
  }
  threadgroup uint flag[1];
  if (!last_threadgroup(tickets + b, G, flag, tid)) {
    return;
  }
  best_key = 0;
  best_token = 0xffffffffu;
  for (uint i = tid; i < G; i += TG) {
    uint key = atomic_load_explicit(partials + 2 * (b * G + i), memory_order_relaxed);
    uint token = atomic_load_explicit(partials + 2 * (b * G + i) + 1, memory_order_relaxed);
    if (better(key, token, best_key, best_token)) {
      best_key = key;
      best_token = token;
    }
  }
  threadgroup_best<TG>(best_key, best_token, buf, lane, sg, tid);
  if (tid == 0) {
    tokens[b] = best_token;
  }
