"""A stand-in for @rules_java that forwards to Bazel's native Java rules.

Bazel 4-6 load @rules_java from their own tools (@bazel_tools//tools/jdk), which
makes them download it. This stub keeps the build offline (see //:WORKSPACE).
"""

java_binary = native.java_binary
java_import = native.java_import
java_library = native.java_library
java_plugin = native.java_plugin
java_runtime = native.java_runtime
java_test = native.java_test
java_toolchain = native.java_toolchain
