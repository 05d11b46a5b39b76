// tpattn/cache.hpp -- the KV-cache interface and its two storages.
#pragma once

#include "tpattn/cache/contiguous_cache.hpp"
#include "tpattn/cache/kv_cache.hpp"
#include "tpattn/cache/model_record.hpp"
#include "tpattn/cache/paged_cache.hpp"
#include "tpattn/cache/record.hpp"
#include "tpattn/cache/sequence_view.hpp"
