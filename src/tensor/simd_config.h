// Highway configuration shared by every translation unit of this module that includes Highway;
// include it first so all of them agree on the set of compiled targets.
#pragma once

// AVX3_DL (AVX-512 VNNI + VBMI, Ice Lake / Zen 4 and later) is opt-in in Highway 1.0.x; our int8
// kernels need it for vpdpbusd and vpermt2b.
#ifndef HWY_WANT_AVX3_DL
#define HWY_WANT_AVX3_DL
#endif
// SSSE3/SSE4 kernels would be little faster than the portable fallback but cost compile time;
// x86-64 CPUs without AVX2 use the fallback.
#ifndef HWY_DISABLED_TARGETS
#define HWY_DISABLED_TARGETS (HWY_SSSE3 | HWY_SSE4)
#endif
