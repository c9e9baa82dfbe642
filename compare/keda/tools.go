// Package keda only pins KEDA's module; the binaries are built with
// `go build github.com/kedacore/keda/v2/cmd/...` from this directory (make keda-build).
package keda
