"""khod_client: the SDK a component uses to take part in a khod handover."""
