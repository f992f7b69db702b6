"""A stand-in for @rules_cc that forwards to Bazel's native C++ rules.

Bazel 4-6 load @rules_cc from their own tools (@bazel_tools//tools/cpp), which makes
them download it. This stub keeps the build offline (see //:WORKSPACE).
"""

cc_binary = native.cc_binary
cc_import = native.cc_import
cc_library = native.cc_library
cc_proto_library = native.cc_proto_library
cc_test = native.cc_test
cc_toolchain = native.cc_toolchain
cc_toolchain_suite = native.cc_toolchain_suite
fdo_prefetch_hints = native.fdo_prefetch_hints
fdo_profile = native.fdo_profile
objc_import = native.objc_import
objc_library = native.objc_library
