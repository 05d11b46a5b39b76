// Compiled to assembly, optimised, by tests/codegen/check_prefetch.cmake, which fails unless the
// output holds prefetch instructions: GCC 12 at -O2 and above with NDEBUG deleted every
// __builtin_prefetch loop of the dense scorer as dead code, so release builds prefetched nothing
// while the source read as if they did. One decode call over float and one over bfloat16 storage.
#include "tpattn/kernels/dense_scorer.hpp"

template <class Storage>
void decode(const tpattn::DenseScorer<Storage>& scorer, const float* q,
            const tpattn::SequenceView& view, const tpattn::KeyRange& range, float* out,
            float* workspace) {
  scorer.run(q, 1, view, range, out, nullptr, workspace);
}

template void decode(const tpattn::DenseScorer<float>&, const float*, const tpattn::SequenceView&,
                     const tpattn::KeyRange&, float*, float*);
template void decode(const tpattn::DenseScorer<Eigen::bfloat16>&, const float*,
                     const tpattn::SequenceView&, const tpattn::KeyRange&, float*, float*);
