// Compiling a region of functions for instruction sets beyond those of its file or target:
//   QF_PUSH_TARGET("amx-tile,avx512f") ... QF_POP_TARGET
// and, between HWY_BEFORE_NAMESPACE() and HWY_AFTER_NAMESPACE(), Highway's current target plus
// more (Highway's AVX3_DL target does not list AVX512-VNNI):
//   QF_EXTEND_HWY_TARGET("avx512vnni") ... QF_END_HWY_EXTENSION
// GCC adds a nested target pragma to the enclosing one. Clang keeps the first target attribute a
// function gets, so there the region closes Highway's attribute scope, opens one with the whole
// feature string, and reopens Highway's at its end. The code inside still runs only where the
// CPU has the extra instructions (the callers check at run time).
#pragma once

#define QF_PRAGMA(tokens) _Pragma(#tokens)

#if defined(__clang__)
#define QF_PUSH_TARGET(features) QF_PRAGMA(clang attribute push(__attribute__((target(features))), apply_to = function))
#define QF_POP_TARGET QF_PRAGMA(clang attribute pop)
#define QF_EXTEND_HWY_TARGET(extra) QF_POP_TARGET QF_PUSH_TARGET(HWY_TARGET_STR "," extra)
#define QF_END_HWY_EXTENSION QF_POP_TARGET QF_PUSH_TARGET(HWY_TARGET_STR)
#else
#define QF_PUSH_TARGET(features) QF_PRAGMA(GCC push_options) QF_PRAGMA(GCC target(features))
#define QF_POP_TARGET QF_PRAGMA(GCC pop_options)
#define QF_EXTEND_HWY_TARGET(extra) QF_PUSH_TARGET(extra)
#define QF_END_HWY_EXTENSION QF_POP_TARGET
#endif
