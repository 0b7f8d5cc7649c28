"""asyncflow: an embedded, asyncio-native DAG workflow engine on SQL."""
