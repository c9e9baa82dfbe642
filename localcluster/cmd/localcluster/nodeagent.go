package main

import (
	"context"
	"errors"

	"warren.dev/localcluster/internal/controlplane"
)

// nodeAgent returns the function that runs the node agent inside `up`.
func nodeAgent(_ controlplane.Config, _ upFlags) func(ctx context.Context) error {
	return func(context.Context) error {
		return errors.New("the node agent is not built into this binary yet; use --control-plane-only")
	}
}
