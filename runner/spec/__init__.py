"""Reading what the user wrote: config, integration specs, templates, JMESPath functions and their compilation, secrets references, JSON Schema validation."""
