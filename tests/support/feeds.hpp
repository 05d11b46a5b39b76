// tests/support/feeds.hpp -- the ways a test feeds a sequence's tokens to a layer.
//
//   for (Feed feed : kAllFeeds) {
//     SCOPED_TRACE(name_of(feed));
//     ... run x through a fresh sequence as `feed` says, compare with the reference ...
//   }
//
// The enum only names the feeds; each test file's runner carries them out (gqa_test's
// run_sequence, mla_test's steps_for, tpa_test's run_layer) and says there which chunk sizes it
// uses. name_of() (and operator<<, for gtest's messages) give "Decode", "Prefill", "Chunked" and
// "PrefillThenDecode", which parameterised tests put in their names.
#pragma once

#include <ostream>

namespace tpattn::test {

enum class Feed {
  decode,              // one decode() step per token
  prefill,             // one prefill() of every token
  chunked,             // prefill() in chunks (mla_test mixes single decode() steps in)
  prefill_then_decode  // one prefill() of the first half, then one decode() per token
};

inline constexpr Feed kAllFeeds[] = {Feed::decode, Feed::prefill, Feed::chunked,
                                     Feed::prefill_then_decode};
// The three that gqa_test and mla_test run: every feed but prefill_then_decode.
inline constexpr Feed kDecodePrefillChunked[] = {Feed::decode, Feed::prefill, Feed::chunked};

inline const char* name_of(Feed feed) {
  switch (feed) {
    case Feed::decode: return "Decode";
    case Feed::prefill: return "Prefill";
    case Feed::chunked: return "Chunked";
    case Feed::prefill_then_decode: return "PrefillThenDecode";
  }
  return "?";
}

inline std::ostream& operator<<(std::ostream& out, Feed feed) { return out << name_of(feed); }

}  // namespace tpattn::test
