package nodeagent

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/klog/v2"
	"k8s.io/utils/ptr"
)

// The default StorageClass and its provisioner: a PVC of the class gets a hostPath PV on a
// directory under the state dir; the PV controller (kube-controller-manager) binds them; a
// released PV with reclaimPolicy Delete loses its directory and object.
const (
	StorageClassName = "local-path"
	ProvisionerName  = "warren.dev/local-path"
	provisionedByAnn = "pv.kubernetes.io/provisioned-by"
	storageProvAnn   = "volume.kubernetes.io/storage-provisioner"
	betaProvAnn      = "volume.beta.kubernetes.io/storage-provisioner"
)

type provisioner struct {
	a *agent
	kicker
}

func newProvisioner(a *agent) *provisioner {
	return &provisioner{a: a, kicker: make(kicker, 1)}
}

func (p *provisioner) volumesDir() string { return filepath.Join(p.a.cfg.StateDir, "volumes") }

func (p *provisioner) ensureStorageClass(ctx context.Context) error {
	sc := &storagev1.StorageClass{
		ObjectMeta: metav1.ObjectMeta{
			Name:        StorageClassName,
			Annotations: map[string]string{"storageclass.kubernetes.io/is-default-class": "true"},
		},
		Provisioner:       ProvisionerName,
		ReclaimPolicy:     ptr.To(corev1.PersistentVolumeReclaimDelete),
		VolumeBindingMode: ptr.To(storagev1.VolumeBindingImmediate),
	}
	_, err := p.a.client.StorageV1().StorageClasses().Create(ctx, sc, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("default StorageClass: %w", err)
	}
	return nil
}

func (p *provisioner) run(ctx context.Context) {
	tick := time.NewTicker(15 * time.Second)
	defer tick.Stop()
	for {
		p.reconcile(ctx)
		select {
		case <-ctx.Done():
			return
		case <-p.kicker:
		case <-tick.C:
		}
	}
}

func (p *provisioner) reconcile(ctx context.Context) {
	pvcs, err := p.a.pvcLister.List(labels.Everything())
	if err != nil {
		return
	}
	for _, pvc := range pvcs {
		if pvc.Spec.VolumeName != "" || pvc.DeletionTimestamp != nil {
			continue
		}
		prov := pvc.Annotations[storageProvAnn]
		if prov == "" {
			prov = pvc.Annotations[betaProvAnn]
		}
		if prov != ProvisionerName {
			continue
		}
		if err := p.provision(ctx, pvc); err != nil {
			klog.ErrorS(err, "provisioning", "pvc", klog.KObj(pvc))
		}
	}
	pvs, err := p.a.pvLister.List(labels.Everything())
	if err != nil {
		return
	}
	for _, pv := range pvs {
		if pv.Annotations[provisionedByAnn] != ProvisionerName || pv.Status.Phase != corev1.VolumeReleased ||
			pv.Spec.PersistentVolumeReclaimPolicy != corev1.PersistentVolumeReclaimDelete || pv.DeletionTimestamp != nil {
			continue
		}
		if pv.Spec.HostPath != nil && strings.HasPrefix(pv.Spec.HostPath.Path, p.volumesDir()+string(filepath.Separator)) {
			if err := os.RemoveAll(pv.Spec.HostPath.Path); err != nil {
				klog.ErrorS(err, "removing volume directory", "pv", pv.Name)
				continue
			}
		}
		err := p.a.client.CoreV1().PersistentVolumes().Delete(ctx, pv.Name, metav1.DeleteOptions{})
		if err != nil && !apierrors.IsNotFound(err) {
			klog.ErrorS(err, "deleting released PV", "pv", pv.Name)
		}
	}
}

func (p *provisioner) provision(ctx context.Context, pvc *corev1.PersistentVolumeClaim) error {
	name := "pvc-" + string(pvc.UID)
	if _, err := p.a.pvLister.Get(name); err == nil {
		return nil
	}
	dir := filepath.Join(p.volumesDir(), name)
	if err := os.MkdirAll(dir, 0o777); err != nil {
		return err
	}
	if err := os.Chmod(dir, 0o777); err != nil {
		return err
	}
	size := pvc.Spec.Resources.Requests[corev1.ResourceStorage]
	class := StorageClassName
	if pvc.Spec.StorageClassName != nil {
		class = *pvc.Spec.StorageClassName
	}
	modes := pvc.Spec.AccessModes
	if len(modes) == 0 {
		modes = []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOnce}
	}
	pv := &corev1.PersistentVolume{
		ObjectMeta: metav1.ObjectMeta{Name: name, Annotations: map[string]string{provisionedByAnn: ProvisionerName}},
		Spec: corev1.PersistentVolumeSpec{
			Capacity:                      corev1.ResourceList{corev1.ResourceStorage: size},
			AccessModes:                   modes,
			PersistentVolumeReclaimPolicy: corev1.PersistentVolumeReclaimDelete,
			StorageClassName:              class,
			VolumeMode:                    pvc.Spec.VolumeMode,
			ClaimRef: &corev1.ObjectReference{
				Kind: "PersistentVolumeClaim", APIVersion: "v1",
				Namespace: pvc.Namespace, Name: pvc.Name, UID: pvc.UID,
			},
			PersistentVolumeSource: corev1.PersistentVolumeSource{
				HostPath: &corev1.HostPathVolumeSource{Path: dir, Type: ptr.To(corev1.HostPathDirectory)},
			},
		},
	}
	if _, err := p.a.client.CoreV1().PersistentVolumes().Create(ctx, pv, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return err
	}
	klog.InfoS("provisioned volume", "pvc", klog.KObj(pvc), "pv", name, "dir", dir)
	return nil
}

// ClaimPath implements volumeSource: the directory of a bound PVC.
func (a *agent) ClaimPath(_ context.Context, namespace, claim string) (string, error) {
	pvc, err := a.pvcLister.PersistentVolumeClaims(namespace).Get(claim)
	if err != nil {
		return "", fmt.Errorf("claim %s: %w", claim, err)
	}
	if pvc.Spec.VolumeName == "" || pvc.Status.Phase != corev1.ClaimBound {
		return "", fmt.Errorf("claim %s is not bound yet", claim)
	}
	pv, err := a.pvLister.Get(pvc.Spec.VolumeName)
	if err != nil {
		return "", fmt.Errorf("volume %s of claim %s: %w", pvc.Spec.VolumeName, claim, err)
	}
	switch {
	case pv.Spec.HostPath != nil:
		return pv.Spec.HostPath.Path, nil
	case pv.Spec.Local != nil:
		return pv.Spec.Local.Path, nil
	}
	return "", fmt.Errorf("volume %s is neither hostPath nor local", pv.Name)
}
