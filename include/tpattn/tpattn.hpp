// tpattn/tpattn.hpp -- everything: the KV cache, the kernels and the five operators.
#pragma once

#include "tpattn/attention/gqa.hpp"
#include "tpattn/attention/mla.hpp"
#include "tpattn/attention/tpa.hpp"
#include "tpattn/cache.hpp"
#include "tpattn/kernels/softmax_state.hpp"
