"""sfrtr: share Salesforce OAuth grants safely across asyncio workers."""
