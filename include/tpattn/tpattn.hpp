// tpattn/tpattn.hpp -- everything: the KV cache, the kernels, the five operators and the
// interface that chooses one at run time.
#pragma once

#include "tpattn/attention/any_attention.hpp"
#include "tpattn/attention/attention_family.hpp"
#include "tpattn/attention/attention_spec.hpp"
#include "tpattn/attention/gqa.hpp"
#include "tpattn/attention/mla.hpp"
#include "tpattn/attention/parse_attention_spec.hpp"
#include "tpattn/attention/tpa.hpp"
#include "tpattn/cache.hpp"
#include "tpattn/kernels/softmax_state.hpp"
