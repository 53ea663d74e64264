"""The cloud path: an EKS cluster with one managed node group per spec node group.

Chosen by `kubernetes.cloud: aws`. GPU groups get the GPU AMI (driver and toolkit included),
the GPU taint, the GPU product label and `llmctl.io/node-group`, so the same pod selectors
and tolerations as on-premises apply. The API endpoint is private unless the spec opts in.
The Kubernetes provider built from the cluster's kubeconfig is the parent of everything else.
"""

from __future__ import annotations

import json

import pulumi
import pulumi_aws as aws
import pulumi_eks as eks
import pulumi_kubernetes as k8s

from controlplane.infra import manifests as m
from controlplane.spec import ClusterSpec

NODE_POLICIES = (
    "arn:aws:iam::aws:policy/AmazonEKSWorkerNodePolicy",
    "arn:aws:iam::aws:policy/AmazonEKS_CNI_Policy",
    "arn:aws:iam::aws:policy/AmazonEC2ContainerRegistryReadOnly",
)
EC2_TRUST = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}],
}


def node_group_args(spec: ClusterSpec, index: int) -> dict:
    """Managed node group settings for spec.node_groups[index] (pure; the tests read it)."""
    g = spec.node_groups[index]
    labels = {**g.node_labels, m.GROUP_LABEL: g.name}
    args: dict = {
        "instance_types": [m.instance_type(g, index)],
        "scaling_config": {
            "desired_size": g.node_count,
            "min_size": g.min_nodes if g.min_nodes is not None else g.node_count,
            "max_size": g.node_count,
        },
        "disk_size": spec.kubernetes.aws.disk_size_gib,
        "gpu": bool(g.gpus_per_node),
    }
    if g.gpus_per_node:
        labels[spec.kubernetes.gpu_product_label] = m.gpu_product(g, index)
        args["taints"] = [{"key": spec.kubernetes.gpu_taint_key, "value": "present", "effect": "NO_SCHEDULE"}]
        args["enable_efa_support"] = spec.network.rdma and g.role == "train"
    args["labels"] = labels
    return args


class EksCluster(pulumi.ComponentResource):
    """EKS control plane, node IAM role, managed node groups, and a Kubernetes provider for it."""

    kubeconfig: pulumi.Output[str]
    provider: k8s.Provider

    def __init__(self, name: str, spec: ClusterSpec, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("llmctl:infra:EksCluster", name, None, opts)
        a = spec.kubernetes.aws
        aws_provider = aws.Provider(
            f"{name}-aws", region=spec.kubernetes.region, opts=pulumi.ResourceOptions(parent=self)
        )
        child = pulumi.ResourceOptions(parent=self, provider=aws_provider)
        role = aws.iam.Role(f"{name}-nodes", assume_role_policy=json.dumps(EC2_TRUST), opts=child)
        attachments = [
            aws.iam.RolePolicyAttachment(f"{name}-nodes-{i}", role=role.name, policy_arn=arn, opts=child)
            for i, arn in enumerate(NODE_POLICIES)
        ]
        cluster_args: dict = {
            "version": a.kubernetes_version,
            "skip_default_node_group": True,
            "instance_roles": [role],
            "endpoint_private_access": True,
            "endpoint_public_access": a.endpoint_public_access,
        }
        if a.endpoint_public_access and a.public_access_cidrs:
            cluster_args["public_access_cidrs"] = a.public_access_cidrs
        if a.vpc_id:
            cluster_args["vpc_id"] = a.vpc_id
        if a.subnet_ids:
            cluster_args["subnet_ids"] = a.subnet_ids
        cluster = eks.Cluster(
            name,
            **cluster_args,
            opts=pulumi.ResourceOptions(parent=self, providers={"aws": aws_provider}, depends_on=attachments),
        )
        self.node_groups = [
            eks.ManagedNodeGroup(
                f"{name}-{g.name}",
                cluster=cluster,
                node_role=role,
                **node_group_args(spec, i),
                opts=pulumi.ResourceOptions(parent=self, providers={"aws": aws_provider}),
            )
            for i, g in enumerate(spec.node_groups)
        ]
        self.kubeconfig = pulumi.Output.secret(cluster.kubeconfig_json)
        self.provider = k8s.Provider(
            f"{name}-k8s",
            kubeconfig=self.kubeconfig,
            opts=pulumi.ResourceOptions(parent=self, depends_on=self.node_groups),
        )
        self.register_outputs({"kubeconfig": self.kubeconfig})
