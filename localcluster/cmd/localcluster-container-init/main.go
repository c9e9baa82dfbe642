// localcluster-container-init is the node agent's container init (package containerinit) as a
// binary of its own: it starts in milliseconds where the localcluster binary, which links all of
// Kubernetes, takes hundreds. The node agent runs it when it lies next to the localcluster binary.
package main

import "warren.dev/localcluster/internal/containerinit"

func main() {
	containerinit.Main()
}
