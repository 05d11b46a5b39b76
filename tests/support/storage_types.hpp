// tests/support/storage_types.hpp -- the cache storage types, chosen at run time.
//
//   for (StorageType storage : kAllStorage)
//     with_storage(storage, [&](auto tag) {
//       using S = decltype(tag);  // float, Eigen::bfloat16 or Eigen::half
//       MultiHeadLatentAttention<S> op(config, weights);
//       ...
//     });
#pragma once

#include "tpattn/core/storage_type.hpp"

namespace tpattn::test {

inline constexpr StorageType kAllStorage[] = {StorageType::f32, StorageType::bf16,
                                              StorageType::f16};

// Calls f(S{}) with S the C++ type of a runtime storage type, and returns what f returns.
template <class F>
decltype(auto) with_storage(StorageType type, F&& f) {
  switch (type) {
    case StorageType::bf16: return f(Eigen::bfloat16{});
    case StorageType::f16: return f(Eigen::half{});
    case StorageType::f32: break;
  }
  return f(float{});
}

}  // namespace tpattn::test
